"""mem-dist: multimodal unlearnable examples (MEM) for WebDataset shard collections."""

__version__ = "0.1.0"
