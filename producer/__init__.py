"""The producer: reads a collection, chunks it, stages batches, enqueues, follows."""
