"""Pre-training: recipes, the training loop, optimisers, FSDP2 + expert parallel, resumable checkpoints."""

from glm5._lazy import lazy_exports

_HOMES = {
    "Trainer": "glm5.train.pretrain",
    "RECIPES": "glm5.train.recipe",
    "Stage": "glm5.train.recipe",
    "TrainRecipe": "glm5.train.recipe",
    "recipe_preset": "glm5.train.recipe",
}
__getattr__, __all__ = lazy_exports("glm5.train", _HOMES)
