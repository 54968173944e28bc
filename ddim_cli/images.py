"""Image and array files: grids, PNG folders, FID-style ``.npz`` files, latents and input images.

Model space is float in [-1, 1], shape (N, C, H, W); files hold uint8 pixels.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from ddim_cli.data import as_8bit, image_transform
from ddim_cli.outputs import written_whole


class ImageFileError(RuntimeError):
    """An image or array file problem, described in one line."""


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] (N, C, H, W) -> uint8 (N, H, W, C), rounding as torchvision's save_image does."""
    pixels = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).numpy()


def _pil(array: np.ndarray) -> Image.Image:
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def image_grid(images: torch.Tensor, nrow: int, padding: int = 2, pad_value: float = -1.0) -> torch.Tensor:
    """(N, C, H, W) -> one (C', H', W') image, ``nrow`` images per row, laid out as torchvision's
    ``make_grid`` lays them (tested against it): ``padding`` pixels around and between them, gray
    images as RGB, a single image as it is. Ours, because importing torchvision costs a command
    about 1 s (it loads torch._dynamo)."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    if len(images) == 1:
        return images[0]
    count, channels, height, width = images.shape
    columns = min(nrow, count)
    rows = math.ceil(count / columns)
    cell_h, cell_w = height + padding, width + padding
    grid = images.new_full((channels, rows * cell_h + padding, columns * cell_w + padding), pad_value)
    for k, image in enumerate(images):
        y, x = divmod(k, columns)
        grid[:, y * cell_h + padding : (y + 1) * cell_h, x * cell_w + padding : (x + 1) * cell_w] = image
    return grid


def save_grid(images: torch.Tensor, path: Path, nrow: int | None = None) -> None:
    """Save a grid (2-pixel padding) with ``nrow`` images per row (default: about square)."""
    nrow = nrow or max(1, math.ceil(math.sqrt(len(images))))
    grid = image_grid(images.detach().float().cpu(), nrow)
    with written_whole(path) as partial:
        _pil(to_uint8(grid[None])[0]).save(partial, format="PNG")


def save_labelled_rows(rows: list[tuple[str, torch.Tensor]], path: Path, min_size: int = 64) -> None:
    """One row of images per label, the label written on the left; small images are enlarged
    (nearest neighbour, by a whole factor) to at least ``min_size`` pixels so they can be seen."""
    factor = max(1, math.ceil(min_size / rows[0][1].shape[-1]))
    rows = [(label, images.repeat_interleave(factor, -1).repeat_interleave(factor, -2)) for label, images in rows]
    font = ImageFont.load_default()
    width = max(int(font.getlength(label)) for label, _ in rows) + 12
    strips = [_pil(to_uint8(image_grid(images.float().cpu(), nrow=len(images))[None])[0]) for _, images in rows]
    strip_w, strip_h = strips[0].size
    canvas = Image.new("RGB", (width + strip_w, strip_h * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, ((label, _), strip) in enumerate(zip(rows, strips, strict=True)):
        canvas.paste(strip.convert("RGB"), (width, i * strip_h))
        draw.text((4, i * strip_h + strip_h // 2), label, fill="black", font=font, anchor="lm")
    with written_whole(path) as partial:
        canvas.save(partial, format="PNG")


def save_pngs(images: torch.Tensor, directory: Path, first_index: int = 0) -> None:
    for offset, array in enumerate(to_uint8(images)):
        with written_whole(directory / f"{first_index + offset:06d}.png") as partial:
            _pil(array).save(partial, format="PNG")


def save_npz(images: np.ndarray, path: Path) -> None:
    """``arr_0`` = uint8 (N, H, W, C), the layout FID tools read."""
    with written_whole(path) as partial, open(partial, "wb") as handle:
        np.savez(handle, images)


def save_latents(latents: torch.Tensor, path: Path) -> None:
    with written_whole(path) as partial, open(partial, "wb") as handle:
        np.save(handle, latents.detach().float().cpu().numpy())
    draws_path(path).unlink(missing_ok=True)  # a record of other latents would mislead


def load_latents(path: Path, shape: tuple[int, int, int]) -> torch.Tensor:
    """A float32 ``.npy`` of shape (N, *shape), as written by ``--save-latents`` or ``ddim invert``."""
    try:
        with open(path, "rb") as handle:
            if handle.read(len(np.lib.format.MAGIC_PREFIX)) != np.lib.format.MAGIC_PREFIX:
                # np.load would try it as a pickle and talk about allow_pickle; an .npz lands here too
                raise ImageFileError(
                    f"latents {path} are not a .npy array (ddim sample --save-latents and ddim invert write one)"
                )
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ImageFileError(f"cannot read latents {path}: {error}") from None
    if array.ndim != 4 or tuple(array.shape[1:]) != tuple(shape) or array.shape[0] < 1:
        raise ImageFileError(
            f"latents {path} have shape {array.shape}; this model needs (N, {', '.join(map(str, shape))})"
        )
    if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
        raise ImageFileError(f"latents {path} must hold finite floating-point values, got {array.dtype}")
    return torch.from_numpy(array.astype(np.float32))


def save_null_embeddings(
    path: Path, null_embeddings: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor, guidance: float
) -> None:
    """Null-text inversion's per-step embeddings (S, N, D) with what they were fitted for."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {
        "null_embeddings": null_embeddings.detach().float().cpu().contiguous(),
        "timesteps": timesteps.detach().long().cpu().contiguous(),
        "labels": labels.detach().long().cpu().contiguous(),
    }
    save_file(tensors, str(path), metadata={"guidance": repr(float(guidance))})


def load_null_embeddings(path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """``(null_embeddings, timesteps, labels, guidance)`` as :func:`save_null_embeddings` wrote them."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
            guidance = float((handle.metadata() or {})["guidance"])
        embeddings, timesteps, labels = tensors["null_embeddings"], tensors["timesteps"], tensors["labels"]
    except (SafetensorError, OSError, ValueError, KeyError) as error:
        raise ImageFileError(f"cannot read null embeddings {path} (from ddim invert --null-text): {error}") from None
    if embeddings.dim() != 3 or embeddings.shape[:2] != (len(timesteps), len(labels)):
        raise ImageFileError(f"null embeddings {path} have shape {tuple(embeddings.shape)}, not (steps, images, dim)")
    return embeddings, timesteps, labels, guidance


def load_images(
    paths: list[Path], image_size: int, channels: int, resize: str = "bicubic"
) -> tuple[torch.Tensor, list[str]]:
    """Read images into [-1, 1], converted and resized (short side, then center crop) for the model.

    ``resize``: nearest, bilinear or bicubic; use the model's own (``data.resize_mode(config.data)``).
    Returns the batch and one note per image that had to be converted or resized.
    """
    transform = image_transform(image_size, channels, resize)
    mode = "L" if channels == 1 else "RGB"
    images, notes = [], []
    for path in paths:
        try:
            with Image.open(path) as image:
                image.load()
                if image.size != (image_size, image_size) or image.mode != mode:
                    notes.append(
                        f"{path}: {image.mode} {image.size[0]}x{image.size[1]} -> {mode} {image_size}x{image_size}"
                    )
                images.append(transform(image))
        except FileNotFoundError:
            raise ImageFileError(f"image {path} does not exist") from None
        except (UnidentifiedImageError, OSError) as error:
            raise ImageFileError(f"cannot read image {path}: {error}") from None
    return torch.stack(images), notes


def image_sizes(paths: list[Path]) -> list[tuple[int, int]]:
    """(width, height) of each image file, read from its header."""
    sizes = []
    for path in paths:
        try:
            with Image.open(path) as image:
                sizes.append(image.size)
        except FileNotFoundError:
            raise ImageFileError(f"image {path} does not exist") from None
        except (UnidentifiedImageError, OSError) as error:
            raise ImageFileError(f"cannot read image {path}: {error}") from None
    return sizes


def load_mask(path: Path, image_size: int, input_size: tuple[int, int] | None = None) -> torch.Tensor:
    """A mask PNG as an (H, W) bool tensor, True where the pixel is known: white (>= 128) marks what
    to fill, as in diffusers' inpainting. It must be the model's size, or the size of the input
    images (``input_size``, (width, height)), in which case it gets their resize, nearest-neighbour."""
    try:
        with Image.open(path) as image:
            gray = as_8bit(image).convert("L")
    except FileNotFoundError:
        raise ImageFileError(f"mask {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as error:
        raise ImageFileError(f"cannot read mask {path}: {error}") from None
    allowed = {(image_size, image_size)} | ({input_size} if input_size else set())
    if gray.size not in allowed:
        sizes = " or ".join(f"{w}x{h}" for w, h in sorted(allowed))
        raise ImageFileError(f"mask {path} is {gray.size[0]}x{gray.size[1]}; it must be {sizes} (model or input size)")
    fill = image_transform(image_size, 1, "nearest")(gray)[0] >= 0  # >= 128 of 255 maps to >= 0 in [-1, 1]
    return ~fill


class PartialNpz:
    """An ``.npz`` with ``arr_0`` = uint8 (N, H, W, C) filled batch by batch, so that N images never
    sit in memory together, and kept when the filling stops short, so that a later run continues it.

    The images go into a memory-mapped ``.NAME.partial.npy`` beside ``path``; :meth:`complete`
    writes ``path`` from it (a zip holding ``arr_0.npy``, stored uncompressed, as ``np.savez``
    writes it) under a temporary name, renames it into place and removes the partial file, so
    ``path`` is complete or absent. ``resume`` reopens a partial file of the same shape (then
    ``resumed`` is true).
    """

    def __init__(self, path: Path, count: int, image_shape: tuple[int, int, int], resume: bool = False):
        self.path, self.count = Path(path), count
        self.partial = self.path.with_name(f".{self.path.name}.partial.npy")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        shape = (count, *image_shape)
        self.images = None
        if resume and self.partial.is_file():
            try:
                self.images = np.lib.format.open_memmap(self.partial, mode="r+")
            except ValueError:  # not an .npy: written over below
                self.images = None
            if self.images is not None and (self.images.shape != shape or self.images.dtype != np.uint8):
                self.images = None
        self.resumed = self.images is not None
        if self.images is None:
            self.images = np.lib.format.open_memmap(self.partial, mode="w+", dtype=np.uint8, shape=shape)

    def write(self, first: int, images: np.ndarray) -> None:
        """Images ``first ..`` as uint8 (n, H, W, C)."""
        if images.dtype != np.uint8 or images.shape[1:] != self.images.shape[1:]:
            raise ValueError(f"expected uint8 (n, {self.images.shape[1:]}) images, got {images.dtype} {images.shape}")
        self.images[first : first + len(images)] = images

    def read(self, first: int, count: int) -> np.ndarray:
        return np.array(self.images[first : first + count])

    def flush(self) -> None:
        self.images.flush()

    def complete(self, chunk: int = 1024) -> None:
        """Write ``path`` from the images (read ``chunk`` at a time) and remove the partial file."""
        import zipfile

        tmp = self.path.with_name(f".{self.path.name}.tmp")  # fixed: a killed run's is written over
        try:
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
                with archive.open("arr_0.npy", "w", force_zip64=True) as entry:
                    header = {"descr": "|u1", "fortran_order": False, "shape": self.images.shape}
                    np.lib.format.write_array_header_1_0(entry, header)
                    for first in range(0, self.count, chunk):
                        entry.write(np.ascontiguousarray(self.images[first : first + chunk]).tobytes())
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        finally:
            tmp.unlink(missing_ok=True)
        del self.images
        self.partial.unlink()


def draws_path(latents: Path) -> Path:
    """Where ``--save-latents`` records what else decided the images: ``z.npy`` -> ``z.npy.json``."""
    return Path(latents).with_name(f"{Path(latents).name}.json")


def load_draws(latents: Path) -> dict | None:
    """The record beside a latents file (:func:`draws_path`), or None if it has none (``ddim invert``'s)."""
    path = draws_path(latents)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        if not isinstance(record.get("seed"), int):
            raise ValueError("no integer seed")
    except (OSError, ValueError, AttributeError) as error:
        raise ImageFileError(f"cannot read {path} (what decided the latents' images): {error}") from None
    return record


class StreamingLatents:
    """A float32 ``.npy`` of (N, C, H, W) latents filled batch by batch through a memory map, written
    under a temporary name and renamed when complete (a context manager; an error removes it).
    ``draws``, if given, is written beside it as JSON (:func:`draws_path`): the seed and classes that,
    with the latents, decide the images."""

    def __init__(self, path: Path, count: int, shape: tuple[int, int, int], draws: dict | None = None):
        self.path, self.count, self.draws = Path(path), count, draws
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A fixed name: a file that a killed run left is written over by the next one.
        self.tmp = self.path.with_name(f".{self.path.name}.partial.npy")
        self.array = np.lib.format.open_memmap(self.tmp, mode="w+", dtype=np.float32, shape=(count, *shape))
        self.written = 0

    def write(self, first: int, latents: torch.Tensor) -> None:
        self.array[first : first + len(latents)] = latents.detach().float().cpu().numpy()
        self.written += len(latents)

    def __enter__(self) -> StreamingLatents:
        return self

    def __exit__(self, kind, error, trace) -> None:
        try:
            self.array.flush()
            del self.array
            if kind is None and self.written == self.count:
                os.replace(self.tmp, self.path)
                record = draws_path(self.path)
                if self.draws is not None:
                    record.with_name(f".{record.name}.tmp").write_text(json.dumps(self.draws) + "\n")
                    os.replace(record.with_name(f".{record.name}.tmp"), record)
                else:
                    record.unlink(missing_ok=True)  # a record of other latents would mislead
        finally:
            self.tmp.unlink(missing_ok=True)
