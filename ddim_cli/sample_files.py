"""What ``ddim sample`` writes, batch by batch, and how far it got, so an interrupted run continues.

The outputs are the grid (of the first ``GRID_LIMIT`` images), a PNG per image (``--out-dir``),
the ``.npz`` (:class:`ddim_cli.images.PartialNpz`) and the latents. When the images go to a
PNG folder or an ``.npz``, a journal beside them (``OUT_DIR/.ddim-sample.json``, else
``.NAME.npz.ddim-sample.json``) records the run's settings and how many images are complete; it
is updated after every batch and removed when the run is complete. A later run with the same
settings starts after those images (every image is a function of its own seed, so the result is
the uninterrupted run's); one with other settings is refused, unless asked to start afresh.
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from pathlib import Path

import torch

from ddim_cli.images import PartialNpz, StreamingLatents, load_images, save_grid, save_pngs, to_uint8
from ddim_cli.outputs import OutputError, remove_partials

GRID_LIMIT = 256


def journal_path(out_dir: Path | None, npz: Path | None) -> Path | None:
    """Where the progress of a run writing ``out_dir`` / ``npz`` is kept (None: nothing to resume)."""
    if out_dir is not None:
        return out_dir / ".ddim-sample.json"
    if npz is not None:
        return npz.with_name(f".{npz.name}.ddim-sample.json")
    return None


def completed_images(journal: Path | None, settings: dict, resume: bool) -> int:
    """How many images an interrupted run with these ``settings`` completed (0: start afresh).

    Raises OutputError when the journal belongs to a run with other settings and ``resume`` is on."""
    if journal is None or not resume or not journal.is_file():
        return 0
    try:
        recorded = json.loads(journal.read_text())
        done, before = int(recorded["done"]), recorded["settings"]
    except (ValueError, KeyError, TypeError):
        return 0  # a damaged journal: nothing can be trusted, so start afresh
    if before != settings:
        changed = ", ".join(
            f"{key} {before.get(key)!r} then, {settings.get(key)!r} now"
            for key in sorted(set(before) | set(settings))
            if before.get(key) != settings.get(key)
        )
        raise OutputError(
            f"{journal.parent} holds an unfinished sample run with other settings ({changed}); "
            "run that command again to finish it, or add --no-resume to start afresh"
        )
    return done


class SampleFiles:
    """The outputs of one ``ddim sample`` run (a context manager). ``done`` images were completed
    by an interrupted run (see :func:`completed_images`); feed the rest with :meth:`add` and those
    with :meth:`skip`. ``enabled=False`` (another rank than torchrun's 0) writes nothing. ``draws``
    is recorded beside the latents file (:class:`ddim_cli.images.StreamingLatents`)."""

    def __init__(
        self, grid, out_dir, npz, latents, count, shape, *, settings: dict, resume: bool, enabled=True, draws=None
    ):
        self.grid, self.out_dir, self.npz, self.latents, self.count = grid, out_dir, npz, latents, count
        self.shape, self.settings, self.enabled = shape, settings, enabled
        self.grid_images, self.stack, self.written = [], ExitStack(), []
        self.npz_file = self.latents_writer = None
        self.journal, self.done = None, 0
        if not enabled:
            return
        self.journal = journal_path(out_dir, npz)
        self.done = completed_images(self.journal, settings, resume)
        if out_dir is not None and out_dir.is_dir():
            remove_partials(out_dir, "??????.png")  # PNGs a killed run was writing
        remove_partials(Path(grid).parent, Path(grid).name)
        if npz is not None:
            self.npz_file = PartialNpz(npz, count, (shape[1], shape[2], shape[0]), resume=self.done > 0)
            if not self.npz_file.resumed:
                self.done = 0
        if out_dir is not None and not all((out_dir / f"{i:06d}.png").is_file() for i in range(self.done)):
            self.done = 0
        if latents is not None:
            self.latents_writer = self.stack.enter_context(StreamingLatents(latents, count, shape, draws))

    def add(self, first: int, x_T: torch.Tensor, images: torch.Tensor) -> None:
        """Images ``first ..`` and their x_T, written; the journal then counts them as done."""
        if not self.enabled:
            return
        self._keep_for_grid(images)
        if self.out_dir is not None:
            save_pngs(images, self.out_dir, first_index=first)
        if self.npz_file is not None:
            self.npz_file.write(first, to_uint8(images))
            self.npz_file.flush()
        if self.latents_writer is not None:
            self.latents_writer.write(first, x_T)
        if self.journal is not None:
            self._record(first + len(images))

    def skip(self, first: int, x_T: torch.Tensor) -> None:
        """Images ``first ..`` (as many as ``x_T``) are done already: read back what the grid shows
        of them and write their x_T."""
        if not self.enabled:
            return
        shown = min(len(x_T), GRID_LIMIT - first)
        if shown > 0:
            if self.npz_file is not None:
                pixels = torch.from_numpy(self.npz_file.read(first, shown)).permute(0, 3, 1, 2)
                self._keep_for_grid(pixels.float() / 127.5 - 1)
            else:
                paths = [self.out_dir / f"{i:06d}.png" for i in range(first, first + shown)]
                self._keep_for_grid(load_images(paths, self.shape[1], self.shape[0])[0])
        if self.latents_writer is not None:
            self.latents_writer.write(first, x_T)

    def _keep_for_grid(self, images: torch.Tensor) -> None:
        kept = sum(len(batch) for batch in self.grid_images)
        if kept < GRID_LIMIT:
            self.grid_images.append(images[: GRID_LIMIT - kept])

    def _record(self, done: int) -> None:
        tmp = self.journal.with_name(f"{self.journal.name}.tmp")
        tmp.write_text(json.dumps({"settings": self.settings, "done": done}))
        os.replace(tmp, self.journal)

    def __enter__(self) -> SampleFiles:
        return self

    def __exit__(self, kind, error, trace) -> None:
        # An error or an interrupt keeps the journal and the partial .npz for the next run; the
        # latents are cheap to draw again and are written whole or not at all.
        self.stack.__exit__(kind, error, trace)
        if kind is not None or not self.enabled:
            return
        if self.npz_file is not None:
            self.npz_file.complete()
        if self.journal is not None:
            self.journal.unlink(missing_ok=True)
        save_grid(torch.cat(self.grid_images), self.grid)
        shown = "" if self.count <= GRID_LIMIT else f" (the first {GRID_LIMIT} images)"
        self.written = [f"{self.grid}{shown}"]
        if self.out_dir is not None:
            self.written.append(f"{self.out_dir}/ ({self.count} PNGs)")
        self.written += [str(path) for path in (self.npz, self.latents) if path is not None]
