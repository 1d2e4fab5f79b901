"""The Llmm method as a library (METHOD.md): a peft user reads this package alone.

config       LlmmConfig, every setting validated once (METHOD_SETTINGS); BASELINES: what LoftQ, QLoRA, LoRA fix
layer        LlmmLinear: a frozen base plus factors that are Gaussian measures; owns its init, delta, merge
quant        block quantisers (normal_float, uniform; 2/4/8 bit), low-bit base layers
loftq        LoftQ, and the one cache of its initialisations (memory, plus an optional LoftQStore)
model        inject into any Hugging Face model, save and load adapters, merge, Monte-Carlo prediction
peft_export  a trained model as a standard peft LoRA adapter plus its base

Imports neither Ray, Optuna nor pyarrow (tests/test_layout.py).
"""
