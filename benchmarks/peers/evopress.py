"""EvoPress depth search (Sieberling et al., 2024): which whole decoder blocks to drop, by evolutionary search.

Follows the official code, github.com/IST-DASLab/EvoPress at commit 50888a01889dddf536b9795ab35a58cc84904d8d
(``evo_drop_search.py``, ``src/metrics.py::compute_kl_div``, defaults from ``scripts/run_drop_search.sh``):

* a search point is the set ``D`` of ``k = round(fraction * L)`` dropped blocks (``--drop_entire_block``: attention
  and MLP of a block go together);
* fitness (``--fitness_fn kl``, their default): ``KL(p_dense || p_D)`` of the next-token distributions, averaged
  over the predicting tokens (``F.kl_div(log p_D, log p_dense, log_target=True, reduction="batchmean")``, last
  position of each window left out) of a minibatch of calibration windows drawn with replacement until it holds
  ``num_tokens`` tokens (``selection``);
* start: ``initially_generated`` distinct random points, the ``population_size`` fittest on ``initial_tokens``;
* each generation: ``offspring`` distinct children of random parents, each with
  ``min(randint(1, max_mutations), randint(1, max_mutations))`` level-switch mutations (one kept block dropped, one
  dropped block kept back); selection in stages ``survivors_per_selection`` x ``tokens_per_selection`` (more
  tokens, fewer survivors; the parents join the last stage: elitist);
* defaults of their script: population 1, offspring 32, 64 initial points on 2048 tokens, stages (2 survivors,
  2048 tokens), (1, 32768), max 3 mutations, ``generations = k (L - k) / 1.5``.

Each fitness evaluation is cheap here: the dense model's input to every layer is cached once for every
calibration window, so a point runs only the layers from its first dropped block on; the dense next-token
distribution is recomputed from the cached dense last-layer output (one LM-head pass; caching the 49152-way
log-probs of all 16,384 calibration tokens would need 3 GB).

Deviations: ``k`` is rounded (their ``int()`` floors, e.g. ``int(0.3 * 30) = 8``); only the harness's 128 x 128
windows are used (their 131,072 tokens in 8192-token sequences), so a 32,768-token stage draws windows with
replacement as their ``selection`` does; ``generations``, ``offspring`` and the token counts are options so the
search fits a CPU budget (the harness states what it passes).
"""

from __future__ import annotations

import random
import time

import torch
import torch.nn.functional as F

from gaqprune.core.layers import batch_layer_inputs, call_layer
from gaqprune.core.surgery import remove_layers

BATCH = 16  # windows per cached micro-batch


def _decoder_params(model) -> int:
    return sum(p.numel() for p in model.model.layers.parameters())


class DropFitness:
    """KL divergence to the dense model of the model with blocks ``D`` dropped, on cached dense layer inputs."""

    def __init__(self, model, calib: torch.Tensor):
        self.model = model
        self.layers = list(model.model.layers)
        self.calib = calib
        batches = [calib[i:i + BATCH] for i in range(0, len(calib), BATCH)]
        self.inputs: list[list[torch.Tensor]] = []  # [batch][layer] dense input to that layer; [batch][L]: output
        with torch.no_grad():
            for hidden, kwargs in batch_layer_inputs(model, batches):
                states = [hidden]
                for layer in self.layers:
                    hidden = _out(call_layer(layer, hidden, kwargs))
                    states.append(hidden)
                self.inputs.append(states)
            # Unpadded windows of one length share their layer keyword arguments (mask, rotary embeddings), so one
            # window's serve every window run alone (a micro-batch's rotary tables would broadcast to its size).
            self.kwargs_one = batch_layer_inputs(model, [calib[:1]])[0][1]
        self.evaluations = 0

    def _log_probs(self, last: torch.Tensor) -> torch.Tensor:
        h = self.model.model.norm(last[:, :-1])  # the last position predicts nothing in the window
        return F.log_softmax(self.model.lm_head(h).float(), dim=-1).reshape(-1, self.model.config.vocab_size)

    @torch.no_grad()
    def window_kl(self, dropped: frozenset[int], window: int) -> float:
        """Summed KL over one window's predicting positions (their ``batchmean`` times the token count)."""
        b, row = divmod(window, BATCH)
        states = self.inputs[b]
        start = min(dropped) if dropped else len(self.layers)
        hidden = states[start][row:row + 1]
        kw = self.kwargs_one
        for i in range(start, len(self.layers)):
            if i not in dropped:
                hidden = _out(call_layer(self.layers[i], hidden, kw))
        target = self._log_probs(states[len(self.layers)][row:row + 1])
        pred = self._log_probs(hidden)
        return F.kl_div(pred, target, log_target=True, reduction="sum").item()

    def __call__(self, dropped: frozenset[int], windows: list[tuple[int, int]]) -> float:
        """Mean per-token KL over ``windows`` = [(window index, tokens used)]: their token-weighted running mean."""
        self.evaluations += 1
        total, tokens = 0.0, 0
        for w, used in windows:
            if used == self.calib.shape[1]:
                total += self.window_kl(dropped, w)
                tokens += used - 1
            else:  # a truncated last window (selection cuts it to the remaining tokens)
                total += self._truncated_kl(dropped, w, used)
                tokens += used - 1
        return total / max(tokens, 1)

    @torch.no_grad()
    def _truncated_kl(self, dropped: frozenset[int], window: int, used: int) -> float:
        # Causal attention: the first `used` positions of a window do not see the rest, so run the prefix alone.
        ids = self.calib[window:window + 1, :used]
        (hidden, kw), = batch_layer_inputs(self.model, [ids])
        dense_hidden = hidden
        for i, layer in enumerate(self.layers):
            dense_hidden = _out(call_layer(layer, dense_hidden, kw))
            if i not in dropped:
                hidden = _out(call_layer(layer, hidden, kw))
        return F.kl_div(self._log_probs(hidden), self._log_probs(dense_hidden), log_target=True,
                        reduction="sum").item()


def _out(result) -> torch.Tensor:
    """A decoder layer returns a tensor (transformers >= 4.54) or a tuple whose first entry is the hidden state."""
    return result[0] if isinstance(result, tuple) else result


def draw_windows(rng: random.Random, num_windows: int, seq_len: int, num_tokens: int) -> list[tuple[int, int]]:
    """Windows drawn with replacement until exactly ``num_tokens`` tokens (``selection`` of evo_drop_search.py)."""
    out, used = [], 0
    while used < num_tokens:
        w = rng.randint(0, num_windows - 1)
        take = min(seq_len, num_tokens - used)
        out.append((w, take))
        used += take
    return out


def search(fitness: DropFitness, num_layers: int, k: int, *, generations: int, offspring: int = 32,
           population_size: int = 1, initially_generated: int = 64, initial_tokens: int = 2048,
           survivors_per_selection: tuple[int, ...] = (2, 1), tokens_per_selection: tuple[int, ...] = (2048, 32768),
           max_mutations: int = 3, seed: int = 0) -> tuple[frozenset[int], float, list[dict]]:
    """The evolutionary search of ``evo_drop_search.py`` (whole blocks). Returns (best D, its last fitness, log)."""
    if survivors_per_selection[-1] != population_size:
        raise ValueError("the last selection stage must keep population_size points (as in evo_drop_search.py)")
    rng = random.Random(seed)
    n_windows, seq_len = fitness.calib.shape

    def select(cands: list[frozenset[int]], survive: int, tokens: int) -> tuple[list[frozenset[int]], list[float]]:
        windows = draw_windows(rng, n_windows, seq_len, tokens)
        fits = [fitness(c, windows) for c in cands]
        order = sorted(range(len(cands)), key=lambda i: (fits[i], sorted(cands[i])))[:survive]
        return [cands[i] for i in order], [fits[i] for i in order]

    max_points = _comb(num_layers, k)
    initial: list[frozenset[int]] = []
    while len(initial) < min(initially_generated, max_points):
        point = frozenset(rng.sample(range(num_layers), k))
        if point not in initial:
            initial.append(point)
    population, fits = select(initial, population_size, initial_tokens)
    log = [{"generation": 0, "best": sorted(population[0]), "fitness": fits[0]}]
    for gen in range(generations):
        children: list[frozenset[int]] = []
        budget = min(offspring, max_points - len(population))
        tries = 0
        while len(children) < budget and tries < 100 * max(budget, 1):
            tries += 1
            child = set(rng.choice(population))
            flips = min(rng.randint(1, max_mutations), rng.randint(1, max_mutations))
            for _ in range(flips):
                # Level switch: drop a kept block, keep a dropped one (sampled by rejection as in their code).
                add = rng.randint(0, num_layers - 1)
                while add in child:
                    add = rng.randint(0, num_layers - 1)
                back = rng.randint(0, num_layers - 1)
                while back not in child:
                    back = rng.randint(0, num_layers - 1)
                child.add(add)
                child.discard(back)
            point = frozenset(child)
            if point in children or point in population:
                continue
            children.append(point)
        for survive, tokens in zip(survivors_per_selection, tokens_per_selection, strict=True):
            if survive == survivors_per_selection[-1]:
                children += [p for p in population if p not in children]  # elitist
            children, fits = select(children, survive, tokens)
        population = children
        log.append({"generation": gen + 1, "best": sorted(population[0]), "fitness": fits[0]})
    return population[0], fits[0], log


def _comb(n: int, k: int) -> int:
    from math import comb

    return comb(n, k)


def prune(model, calib: torch.Tensor, fraction: float, *, generations: int | None = None,
          max_generations: int | None = None, offspring: int = 32, population_size: int = 1,
          initially_generated: int = 64, initial_tokens: int = 2048,
          survivors_per_selection: tuple[int, ...] = (2, 1), tokens_per_selection: tuple[int, ...] = (2048, 32768),
          max_mutations: int = 3, seed: int = 0, **_unused) -> dict:
    """Drop the ``round(fraction * L)`` blocks EvoPress's search finds (KL fitness); ``generations`` defaults to
    their ``k (L - k) / 1.5``, ``max_generations`` caps it for CPU time."""
    t0 = time.time()
    model.eval()
    num_layers = len(model.model.layers)
    before = _decoder_params(model)
    k = round(fraction * num_layers)
    if not 1 <= k < num_layers:
        raise ValueError(f"fraction {fraction} drops {k} of {num_layers} blocks")
    default_generations = int(k * (num_layers - k) / 1.5)
    gens = default_generations if generations is None else generations
    if max_generations is not None:
        gens = min(gens, max_generations)
    fitness = DropFitness(model, calib)
    best, best_fit, log = search(fitness, num_layers, k, generations=gens, offspring=offspring,
                                 population_size=population_size, initially_generated=initially_generated,
                                 initial_tokens=initial_tokens, survivors_per_selection=tuple(survivors_per_selection),
                                 tokens_per_selection=tuple(tokens_per_selection), max_mutations=max_mutations,
                                 seed=seed)
    evaluations = fitness.evaluations
    del fitness
    removed = sorted(best)
    remove_layers(model, removed)
    after = _decoder_params(model)
    return {
        "method": "evopress", "decoder_params_before": before, "decoder_params_after": after,
        "removed_decoder": 1 - after / before, "seconds": round(time.time() - t0, 1),
        "removed_layers": removed, "fitness_kl": best_fit, "fitness_evaluations": evaluations,
        "options": {"generations": gens, "default_generations": default_generations, "offspring": offspring,
                    "population_size": population_size, "initially_generated": initially_generated,
                    "initial_tokens": initial_tokens, "survivors_per_selection": list(survivors_per_selection),
                    "tokens_per_selection": list(tokens_per_selection), "max_mutations": max_mutations, "seed": seed,
                    "fitness": "kl"},
        "search_log": log,
    }
