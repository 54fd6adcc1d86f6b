"""A preallocated KV cache whose layers may hold different lengths.

Layers before the pruning point hold the whole prefill; layers from it on hold only the kept
rows. Alongside the keys we keep, per row, its original position id, whether it is real (not
left padding) and which visual token it is (-1 for text) — what the attention probe needs to
map cached keys back to the 256 visual tokens.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        num_layers: int,
        batch: int,
        kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        shape = (batch, kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = [0] * num_layers
        self.batch, self.max_len = batch, max_len
        # Row metadata, one buffer per "group" (before / after the pruning point).
        self.group = [0] * num_layers
        self.pos = [torch.zeros(batch, max_len, dtype=torch.long, device=device) for _ in range(2)]
        self.valid = [
            torch.zeros(batch, max_len, dtype=torch.bool, device=device) for _ in range(2)
        ]
        self.vis = [
            torch.full((batch, max_len), -1, dtype=torch.long, device=device) for _ in range(2)
        ]
        self.rows_len = [0, 0]  # rows described per group (independent of which layers run)
        self.has_padding = False
        self._visual_cols: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        # per group: (row of its first visual token in every sample, the visual token ids of
        # its visual rows [B, m] or None = all of them in order) when the engine said so
        self._visual_layout: list[tuple[int, torch.Tensor | None] | None] = [None, None]
        self.generation = 0  # prefills begun on this cache (reuse checks it is the last one)

    def fits(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> bool:
        k = self.k[0]
        return (
            self.batch == batch
            and self.max_len >= max_len
            and k.dtype == dtype
            and k.device == torch.device(device)
        )

    def begin_prefill(
        self,
        pos: torch.Tensor,
        valid: torch.Tensor,
        vis: torch.Tensor,
        has_padding: bool,
        visual_start: int | None = None,
    ) -> None:
        """A new prompt: every layer empty (a skipped layer holds nothing, no stale keys) and
        in group 0, whose rows are the whole prefill's. visual_start: the row of visual token
        0 when it is the same in every sample and the visual tokens follow it in order."""
        self.generation += 1
        self.has_padding = has_padding
        self.length = [0] * len(self.k)
        self.group = [0] * len(self.k)
        self.set_rows(0, pos, valid, vis, None if visual_start is None else (visual_start, None))

    def visual_rows(self, num_visual: int) -> list[torch.Tensor | None]:
        """Per layer: the cache row of each visual token [B, num_visual] (-1: not held), None
        for a layer that holds nothing. Taken before the next prefill rewrites the metadata: it
        says where the previous step's K/V of each token are (vla_prune/engine/reuse.py)."""
        by_group: dict[tuple[int, int], torch.Tensor] = {}
        out: list[torch.Tensor | None] = []
        for layer, n in enumerate(self.length):
            g = self.group[layer]
            if n == 0:
                out.append(None)
                continue
            if (g, n) not in by_group:
                vis = self.vis[g][:, :n]
                rows = torch.full(
                    (self.batch, num_visual + 1), -1, dtype=torch.long, device=vis.device
                )
                # text rows (-1) land in the extra last column, which is then dropped
                col = torch.where(vis >= 0, vis, num_visual)
                ar = torch.arange(n, device=vis.device).expand_as(vis)
                by_group[g, n] = rows.scatter_(1, col, ar)[:, :num_visual]
            out.append(by_group[g, n])
        return out

    def prune_from(
        self,
        layer: int,
        pos: torch.Tensor,
        valid: torch.Tensor,
        vis: torch.Tensor,
        visual: tuple[int, torch.Tensor] | None = None,
    ) -> None:
        """Layers from `layer` on hold only the kept rows: group 1, with these rows.
        visual: (row of the first kept visual token in every sample, kept ids [B, k] in row
        order), when the kept rows are contiguous from one row in every sample."""
        self.set_rows(1, pos, valid, vis, visual)
        self.group[layer:] = [1] * (len(self.k) - layer)

    def set_rows(
        self,
        group: int,
        pos: torch.Tensor,
        valid: torch.Tensor,
        vis: torch.Tensor,
        visual: tuple[int, torch.Tensor | None] | None = None,
    ):
        self._visual_cols.pop(group, None)
        self._visual_layout[group] = visual
        n = pos.shape[1]
        self.pos[group][:, :n] = pos
        self.valid[group][:, :n] = valid
        self.vis[group][:, :n] = vis
        self.rows_len[group] = n

    def append_row(self, group: int, pos: torch.Tensor) -> int:
        """Describe one more (text) row of `group` with position ids pos [B]; returns its index.

        The group keeps its own row count, so this works even when every layer of the group
        is skipped (then no layer holds keys for these rows and nothing reads them).
        """
        at = self.rows_len[group]
        self.pos[group][:, at] = pos
        self.valid[group][:, at] = True
        self.vis[group][:, at] = -1
        self.rows_len[group] = at + 1
        return at

    def describe_decode_rows(self, group: int, pos: torch.Tensor) -> None:
        """Metadata of the decode rows to come, all at once: positions pos [B, n] (text rows,
        always valid), right after the group's current rows; rows_len is advanced per token by
        whoever writes them (the static decode step)."""
        at, n = self.rows_len[group], pos.shape[1]
        self.pos[group][:, at : at + n] = pos
        self.valid[group][:, at : at + n] = True
        self.vis[group][:, at : at + n] = -1

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor):
        end = start + k.shape[2]
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        self.length[layer] = end
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def visual_layout(self, layer: int) -> tuple[int, torch.Tensor | None] | None:
        """(row of the first visual token in every sample, visual token ids of the rows from
        there [B, m] or None = all in order) at `layer`, when the engine described it; the
        attention probe then slices instead of searching (attention_probe.to_visual)."""
        return self._visual_layout[self.group[layer]]

    def visual_columns(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cache columns [B, n], visual token ids [B, n]) of the visual rows at `layer`.

        Every sample holds the same number of visual rows (the budget), so this stacks; it is
        computed once per prefill per group (decode appends text rows only).
        """
        g = self.group[layer]
        if g not in self._visual_cols:
            _, _, vis = self.rows(layer)
            cols = torch.stack([(v >= 0).nonzero().squeeze(1) for v in vis])
            self._visual_cols[g] = (cols, vis.gather(1, cols))
        return self._visual_cols[g]

    def rows(self, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(positions, valid, visual index) of the rows cached at `layer`."""
        g, n = self.group[layer], self.length[layer]
        return self.pos[g][:, :n], self.valid[g][:, :n], self.vis[g][:, :n]
