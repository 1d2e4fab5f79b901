"""What every recipe shares: the fit loop and its resumable checkpoints, FSDP sharding, pretrained models
(hub, local or packaged offline), data helpers (sources, validation carves, bad rows) and causal-LM scoring.
Imports the method, never the search machinery."""
