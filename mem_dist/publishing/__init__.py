"""Publishing: run state + source shards -> protected shards (public) and manifest (private).

merge (the pass), merge_config (what it publishes from), publish (the public side in
img2dataset's conventions), manifest (the private side), verify (re-reads every published byte).
"""
