"""The task families, each a recipe that reads top to bottom and meets the contract of
`llmm_tune/tune/family.py`: glue (sequence classification), causal_lm (GSM8K, Alpaca, HH-RLHF) and continual
(GORP over task sequences, with gorp.py). A `<family>_data.py` beside each holds its tasks and data."""
