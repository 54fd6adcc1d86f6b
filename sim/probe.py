"""Probes of a trained policy: does it find the named target, and how far off are its actions?

`probe` (grounding) and `action_errors` (teacher-forced action tokens, by family and action
dimension) say *which* part of a task a weak policy gets wrong.

Grounding:
Reads a run's `train_state.pt` (which, unlike the exported policy, keeps the auxiliary
geometry head of `--aux-weight`), shows the first frame of each episode in a dataset, and
reads off where the head thinks the episode's target is (`sim.dataset.aux_targets`' source
x, y). It counts the episode as grounded when the nearest candidate (button, or object) to
that prediction is the real target; with 3 objects, chance is 1/3.

Run it on held-out scenes (seeds no training set uses) and on training scenes: a large gap
is a model that memorized layouts instead of learning to read the instruction.

    python -m sim.demos --out data/heldout --episodes-per-task 40 --seed-start 1900000
    python -m sim.probe --state runs/e112/train_state.pt --data data/heldout

Actions: for every frame of the dataset's episodes (the expert's states), the distance in bins
between the policy's most likely action token and the expert's, per action dimension. A family
whose dx/dy errors are several times press's is one the policy cannot steer in.

    python -m sim.probe --policy vla_prune/checkpoints/embedded-openvla --data data/heldout

Token positions (`--positions`): does each visual token still say where on the grid it is,
after the vision tower and after the projector? See `token_positions`.

Token offsets (`--offsets`, no dataset: rendered held-out scenes): does each token showing a
thing say where inside its patch that thing is? See `token_offsets`.

Readout (`--readout`, rendered scenes): how well the target's and the gripper's world
position can be read, linearly, off the target's token and off the action query entering each
decoder layer — where along the chain the position gets lost. See `query_readout`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
from collections.abc import Sequence

import numpy as np
import torch

import vla_prune
from sim.dataset import AUX_DIM, AUX_SCALE, DemoBatches, iter_episodes
from sim.envs.embedded import EmbeddedEnv
from sim.grounding import GROUND_HELDOUT_SEED_START, GroundingScenes
from sim.token_position import patch_grid
from sim.train import TrainConfig, action_logits, last_hidden, visual_tokens
from vla_prune.preprocess import image_to_pixels

log = logging.getLogger(__name__)


@torch.no_grad()
def probe(state_path: str, data: str, per_family: int = 40) -> dict[str, dict[str, float]]:
    """Per family: fraction of episodes whose predicted target is the real one, the median
    target error and the median gripper xy error mid-episode, in metres."""
    state = torch.load(state_path, weights_only=True)
    if not state.get("aux_head"):
        raise ValueError(f"{state_path} has no auxiliary head (trained without --aux-weight)")
    cfg = TrainConfig(**state["config"])
    policy = vla_prune.build_policy(cfg.preset, seed=cfg.seed)
    policy.model.load_state_dict(state["model"])
    policy.model.eval()
    head = torch.nn.Linear(policy.config.llm_dim, AUX_DIM)
    head.load_state_dict(state["aux_head"])
    pc = policy.config
    envs: dict[str, EmbeddedEnv] = {}
    hits: dict[str, list[bool]] = {}
    errors: dict[str, list[float]] = {}
    gripper_errors: dict[str, list[float]] = {}
    for ep in iter_episodes(data):
        if len(hits.setdefault(ep.family, [])) >= per_family:
            continue
        env = envs.setdefault(ep.family, EmbeddedEnv(ep.family, image_size=16))
        env.reset(seed=ep.seed)
        task = env.task_instance
        if task.target_object is None:  # press: the target is a button
            target = task.fixtures[task.target_fixture].xy
            candidates = [f.xy for f in task.fixtures]
        else:
            target = task.objects[task.target_object].xy
            candidates = [o.xy for o in task.objects]
        # The first frame for the target; a mid-episode frame (the gripper away from home)
        # for where the head thinks the gripper is.
        mid = len(ep) // 2
        frames = [ep.images[0], ep.images[mid]]
        pixels = torch.cat(
            [image_to_pixels(f, pc.image_size, pc.image_means, pc.image_stds) for f in frames]
        )
        ids = policy.token_ids(ep.instruction)
        hidden, lengths = last_hidden(policy, pixels, [ids, ids])
        out = head(torch.stack([hidden[i, lengths[i] - 1] for i in range(2)])).numpy() / AUX_SCALE
        predicted = out[0, 4:6]
        dist = [float(np.linalg.norm(predicted - np.asarray(c))) for c in candidates]
        hits[ep.family].append(bool(np.allclose(candidates[int(np.argmin(dist))], target)))
        errors.setdefault(ep.family, []).append(float(np.linalg.norm(predicted - target)))
        grip = float(np.linalg.norm(out[1, 0:2] - ep.states[mid, 0:2]))
        gripper_errors.setdefault(ep.family, []).append(grip)
    for env in envs.values():
        env.close()
    return {
        f: {
            "episodes": len(hits[f]),
            "grounded": round(float(np.mean(hits[f])), 3),
            "median_error_m": round(float(np.median(errors[f])), 4),
            "median_gripper_xy_error_m": round(float(np.median(gripper_errors[f])), 4),
        }
        for f in hits
    }


@torch.no_grad()
def action_errors(
    policy: vla_prune.Policy | str, data: str, frames_per_family: int = 512
) -> dict[str, dict]:
    """Per family: mean |predicted bin - expert bin| and exact-token accuracy per action
    dimension [dx, dy, dz, droll, dpitch, dyaw, gripper], teacher forced on up to
    `frames_per_family` frames spread evenly over the family's episodes."""
    if isinstance(policy, str):
        policy = vla_prune.load_policy(policy)
    if getattr(policy.config, "chunk", 0):
        raise ValueError("action_errors reads action tokens: it needs an OpenVLA policy")
    if policy.unnorm_key not in policy.norm_stats:
        raise ValueError("the policy has no action statistics to discretize the expert's actions")
    cfg = TrainConfig(data=data, out="", batch_size=64)
    rows = DemoBatches(data, policy, cfg, stats=policy.norm_stats[policy.unnorm_key])
    families = np.asarray(rows.families)
    policy.model.eval()
    out: dict[str, dict] = {}
    for family in dict.fromkeys(rows.families):
        idx = np.flatnonzero(families == family)
        idx = idx[np.linspace(0, len(idx) - 1, min(frames_per_family, len(idx))).astype(int)]
        errors, hits = [], []
        for chunk in torch.from_numpy(idx).split(cfg.batch_size):
            pixels, prompts, targets, _ = rows.batch(chunk)
            logits, _ = action_logits(policy, pixels, prompts, targets)
            predicted = logits.argmax(-1)
            errors.append((predicted - targets).abs().float())
            hits.append((predicted == targets).float())
        out[family] = {
            "frames": len(idx),
            "bin_error": [round(x, 2) for x in torch.cat(errors).mean(0).tolist()],
            "token_acc": [round(x, 3) for x in torch.cat(hits).mean(0).tolist()],
        }
    return out


@torch.no_grad()
def token_positions(policy: vla_prune.Policy | str, data: str, episodes: int = 200) -> dict:
    """Do the visual tokens say where they are? A least-squares linear probe from each token
    (the vision tower's output, and the projector's: what the LLM sees) to its patch's
    (row, col) on the grid, fitted on half the episodes (their first and middle frames) and
    scored on the other half. The LLM's RoPE is 1-D, so a token that does not carry its
    grid position leaves "where is the target" for the LLM to infer from a flat index."""
    if isinstance(policy, str):
        policy = vla_prune.load_policy(policy)
    pc, model = policy.config, policy.model.eval()
    frames = []  # episode e gives frames 2e and 2e + 1
    for ep in iter_episodes(data):
        if len(frames) >= 2 * episodes:
            break
        frames += [ep.images[0], ep.images[len(ep) // 2]]
    towers: dict[str, list[np.ndarray]] = {"vision": [], "projector": []}
    for i in range(0, len(frames), 16):
        px = torch.cat(
            [
                image_to_pixels(f, pc.image_size, pc.image_means, pc.image_stds)
                for f in frames[i : i + 16]
            ]
        )
        v = model.vision_backbone(px)
        towers["vision"].append(v.float().numpy())
        towers["projector"].append(model.projector(v).float().numpy())
    out = {}
    for name, chunks in towers.items():
        x = np.concatenate(chunks).astype(np.float64)
        n, t, d = x.shape
        y = np.broadcast_to(patch_grid(t).numpy().astype(np.float64), (n, t, 2))
        fit = (np.arange(n) // 2) % 2 == 0  # fit on even episodes, score on odd ones
        pred = _ridge_probe(x[fit].reshape(-1, d), y[fit].reshape(-1, 2), x[~fit].reshape(-1, d))
        truth = y[~fit].reshape(-1, 2)
        out[name] = {
            "row_col_mae_patches": [round(float(e), 3) for e in np.abs(pred - truth).mean(0)],
            "exact": round(float((np.round(pred) == truth).all(1).mean()), 3),
            "chance": round(1 / t, 4),
        }
    return out


def _ridge_probe(x_fit: np.ndarray, y_fit: np.ndarray, x_test: np.ndarray) -> np.ndarray:
    """A least-squares linear map fitted on (x_fit, y_fit), applied to x_test. Ridge (1e-3 of
    the mean feature variance) so a near-singular fit cannot blow up."""
    mean = x_fit.mean(0)
    xc = x_fit - mean
    d = xc.shape[1]
    # a constant feature set (e.g. the query before any layer) fits to the mean, not a crash
    ridge = max(1e-3 * np.trace(xc.T @ xc) / d, 1e-9)
    gram = xc.T @ xc + ridge * np.eye(d)
    w = np.linalg.solve(gram, xc.T @ (y_fit - y_fit.mean(0)))
    return (x_test - mean) @ w + y_fit.mean(0)


@torch.no_grad()
def token_offsets(policy: vla_prune.Policy | str, scenes_per_family: int = 100) -> dict:
    """Do the visual tokens say where inside their patch their thing is? A linear probe from
    each token that shows a thing (object, gripper, fixture: the segmentation render's labels)
    to that thing's sub-patch (col, row) offset, in patches, on the held-out grounding scenes
    (first-frame poses): fitted on even scenes, scored on odd ones, for the vision tower's
    output and the projector's. `no_information` predicts the mean offset. A patch is ~8 cm of
    table, so this is the resolution a grasp needs beyond "which patch"."""
    if isinstance(policy, str):
        policy = vla_prune.load_policy(policy)
    model = policy.model.eval()
    scenes = GroundingScenes(policy)
    n = scenes_per_family * len(scenes.families)
    feats: dict[str, list[np.ndarray]] = {"vision": [], "projector": []}
    offsets, shown, which = [], [], []
    try:
        for start in range(0, n, 32):
            seeds = range(
                GROUND_HELDOUT_SEED_START + start, GROUND_HELDOUT_SEED_START + min(n, start + 32)
            )
            batch = scenes.scenes(list(seeds), None)
            v = model.vision_backbone(batch.pixels)
            feats["vision"].append(v.float().numpy())
            feats["projector"].append(model.projector(v).float().numpy())
            offsets.append(batch.offsets.numpy())
            shown.append(batch.has_thing.numpy())
            which += list(seeds)
    finally:
        scenes.close()
    y, mask = np.concatenate(offsets), np.concatenate(shown)
    fit = (np.asarray(which) % 2 == 0)[:, None] & mask
    test = (np.asarray(which) % 2 == 1)[:, None] & mask
    out = {"tokens_fit": int(fit.sum()), "tokens_scored": int(test.sum())}
    base = np.abs(y[test] - y[fit].mean(0)).mean(0)
    out["no_information_mae_patches"] = [round(float(e), 3) for e in base]
    for name, chunks in feats.items():
        x = np.concatenate(chunks).astype(np.float64)
        pred = _ridge_probe(x[fit], y[fit].astype(np.float64), x[test])
        out[name] = {
            "col_row_mae_patches": [round(float(e), 3) for e in np.abs(pred - y[test]).mean(0)]
        }
    return out


@torch.no_grad()
def query_readout(policy: vla_prune.Policy | str, scenes_per_family: int = 200) -> dict:
    """Where along the chain token -> query is the target's position lost? Linear probes to
    the world (x, y) of the target and of the gripper, median error in cm, from: the target's
    projected token (with a one-hot of its patch), the action query's hidden state entering
    each decoder layer, and the final query (what the action head and the aux head read).
    Rendered held-out scenes (random gripper states, so the gripper moves); fitted on even
    scenes, scored on odd ones. A representation that reads out to ~1 cm holds what a grasp
    needs; the first one in the chain that does not is where it is lost."""
    from sim.query_attention import capture_layer_input
    from sim.seglabels import ENT_GRIPPER, SceneSampler

    if isinstance(policy, str):
        policy = vla_prune.load_policy(policy)
    model, pc = policy.model.eval(), policy.config
    layers = model.language_model.model.layers
    reps: dict[str, list[np.ndarray]] = {"target token": []}
    reps |= {f"query into layer {i}": [] for i in range(len(layers))}
    reps["query final"] = []
    truth, which = [], []
    grid = int(round(pc.num_patches**0.5))
    for family in ("press", "push", "pick_place", "stack"):
        sampler = SceneSampler(family)
        try:
            for k in range(scenes_per_family):
                seed = GROUND_HELDOUT_SEED_START + k
                f = sampler.frame(seed, np.random.default_rng(seed), home=False)
                col, row = np.clip(
                    (f.ent_uv[f.target] * grid / f.image.shape[0]).astype(int), 0, grid - 1
                )
                pixels = image_to_pixels(f.image, pc.image_size, pc.image_means, pc.image_stds)
                patches = visual_tokens(policy, pixels)
                with contextlib.ExitStack() as stack:
                    seen = [stack.enter_context(capture_layer_input(layer)) for layer in layers]
                    prompt = [policy.token_ids(f.instruction)]
                    hidden, (n,) = last_hidden(policy, pixels, prompt, patches=patches)
                token = patches[0, row * grid + col]
                onehot = np.eye(pc.num_patches)[row * grid + col]
                reps["target token"].append(np.r_[token.float().numpy(), onehot])
                for i, got in enumerate(seen):
                    reps[f"query into layer {i}"].append(got["hidden"][0, n - 1].float().numpy())
                reps["query final"].append(hidden[0, n - 1].float().numpy())
                truth.append(np.r_[f.ent_xy[f.target], f.ent_xy[ENT_GRIPPER]])
                which.append(k)
        finally:
            sampler.close()
    y = np.asarray(truth, dtype=np.float64)
    fit = np.asarray(which) % 2 == 0
    out: dict = {"scenes_fit": int(fit.sum()), "scenes_scored": int((~fit).sum())}

    def cm(pred: np.ndarray, true: np.ndarray) -> float:
        return round(float(np.median(np.linalg.norm(pred - true, axis=1))) * 100, 2)

    out["no_information"] = {
        "target_cm": cm(y[fit, :2].mean(0), y[~fit, :2]),
        "gripper_cm": cm(y[fit, 2:].mean(0), y[~fit, 2:]),
    }
    for name, rows in reps.items():
        x = np.asarray(rows, dtype=np.float64)
        pred = _ridge_probe(x[fit], y[fit], x[~fit])
        out[name] = {
            "target_cm": cm(pred[:, :2], y[~fit, :2]),
            "gripper_cm": cm(pred[:, 2:], y[~fit, 2:]),
        }
    return out


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument("--state", help="grounding: a run's train_state.pt (with its aux head)")
    which.add_argument("--policy", help="action errors: an OpenVLA checkpoint dir")
    ap.add_argument("--data", help="dataset dir(s), a,b,... (all but --offsets)")
    ap.add_argument("--per-family", type=int, default=40, help="grounding: episodes per family")
    ap.add_argument("--frames", type=int, default=512, help="actions: frames per family")
    ap.add_argument(
        "--positions", action="store_true", help="with --policy: the token-position probe"
    )
    ap.add_argument(
        "--offsets",
        action="store_true",
        help="with --policy: the sub-patch offset probe (rendered held-out scenes, no --data)",
    )
    ap.add_argument(
        "--readout",
        action="store_true",
        help="with --policy: target / gripper xy read out along token -> query (no --data)",
    )
    ap.add_argument("--scenes", type=int, default=200, help="--readout: scenes per family")
    args = ap.parse_args(argv)
    rendered = args.offsets or args.readout
    if rendered and not args.policy:
        ap.error("--offsets and --readout need --policy")
    if not rendered and not args.data:
        ap.error("--data is required (all probes but --offsets / --readout read a dataset)")
    torch.set_num_threads(1)
    try:
        if args.state:
            result = probe(args.state, args.data, args.per_family)
        elif args.readout:
            result = query_readout(args.policy, args.scenes)
        elif args.offsets:
            result = token_offsets(args.policy)
        elif args.positions:
            result = token_positions(args.policy, args.data)
        else:
            result = action_errors(args.policy, args.data, args.frames)
    except (ValueError, FileNotFoundError) as e:  # e.g. a CogACT policy, a state without aux
        ap.error(str(e))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
