"""Scoring and ordering without models: exact top-k over shards (the retrieve stage),
fusion of rankings, the exported sparse weights, and the evaluation against judgements."""
