"""A worker process's machinery, the same for every stage: the worker context, the task
hooks, the GPU lease, model staging at start, thread shares, batch measurements."""
