"""The Llmm method as a library (METHOD.md): a peft user reads this package alone.

config   LlmmConfig, every setting validated once; the baselines (LoftQ, QLoRA, LoRA) as configs
layer    LlmmLinear: a frozen base plus factors that are Gaussian measures; owns its init, delta, merge
quant    block quantisers (normal_float, uniform; 2/4/8 bit), LoftQ, low-bit base layers
model    inject into any Hugging Face model, save and load adapters, merge, Monte-Carlo prediction

Imports neither Ray, Optuna nor pyarrow.
"""
