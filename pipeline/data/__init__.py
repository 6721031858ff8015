"""The data path, in reading order: sources.py (records from files) -> tokenizer.py -> shards.py
(zstd Arrow shards with manifests) -> mixer.py (exact proportions, replay) -> packer.py (seq_len
windows) -> stream.py (a resumable, rank-sliced stream of batches) -> loader.py (DataLoader
workers). Data code never imports model or training code."""
