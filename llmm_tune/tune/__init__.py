"""The search machinery: the family contract, search-space files, the Optuna searcher behind Ray Tune, the
trainable and the one runner of a recipe, multi-worker trials, clusters and storage, the console and the
experiment's record."""
