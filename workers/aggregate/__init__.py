"""The aggregator's steps between and after the phases: plan the retrieve phase, fuse
the rankings and fan reranking out, and export the artifacts with the manifest last."""
