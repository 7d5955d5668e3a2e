"""MAGI-1 pipelines and their pre/post-processing."""
