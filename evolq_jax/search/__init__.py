"""Evol-Q search: space, fitness, strategies, engine."""
from evolq_jax.search.engine import SearchConfig, SearchResult, calibration_fitness, search, search_block
from evolq_jax.search.fitness import population_fitness, prefix_activations, reference_logits
from evolq_jax.search.space import SearchSpace, block_scales, set_block_scales
from evolq_jax.search.strategies import STRATEGIES, make_strategy
