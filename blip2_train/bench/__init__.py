"""``python -m blip2_train.bench`` (``make bench``): the training steps timed and their FLOPs counted
(harness.py), beside LAVIS's own Q-Former step (peer_lavis.py)."""
