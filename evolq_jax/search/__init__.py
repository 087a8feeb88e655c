"""Evol-Q search: settings, space, fitness, strategies, selection, engine."""
from evolq_jax.search.engine import search, search_block
from evolq_jax.search.fitness import (calibration_fitness, population_fitness, prefix_activations,
                                      reference_logits)
from evolq_jax.search.settings import SearchConfig, SearchResult
from evolq_jax.search.space import SearchSpace, searched_scales, set_scales, unit_scales
from evolq_jax.search.strategies import STRATEGIES, make_strategy
