"""The merge floor: tensor plans, the memory model, the DogeRM recipe, `plan_merge`, model
cards rendered from a plan, the engine that executes it, and the Python API (`merge`)."""
