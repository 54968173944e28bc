import itertools
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from ddim_cli import training_data
from ddim_cli.config import Config, DataConfig, config_from_dict
from ddim_cli.data import NO_LABEL, DataError, build_dataset, image_transform
from ddim_cli.run_loop import TrainingError
from ddim_cli.training_data import DeviceImages, _loader_batches, _on_device_batches, data_batches, holds_on_device


def test_digits_are_the_real_offline_set_in_range():
    dataset = build_dataset(DataConfig(dataset="digits", image_size=16, channels=1))
    assert len(dataset) == 1797 and dataset.num_classes == 10
    image, label = dataset[0]
    assert image.shape == (1, 16, 16) and image.dtype == torch.float32
    assert -1 <= image.min() and image.max() <= 1 and label == 0
    assert sorted({int(dataset[i][1]) for i in range(20)}) == list(range(10))
    assert build_dataset(DataConfig(dataset="digits", image_size=8, channels=3))[5][0].shape == (3, 8, 8)


def test_the_digits_read_without_scikit_learn_are_load_digits_exactly(monkeypatch):
    import importlib.util
    import subprocess
    import sys

    from sklearn.datasets import load_digits

    from ddim_cli.data import load_digits_arrays

    images, labels = load_digits_arrays()
    reference = load_digits()
    assert images.dtype == reference.images.dtype and np.array_equal(images, reference.images)
    assert labels.dtype == reference.target.dtype and np.array_equal(labels, reference.target)
    probe = "import sys; from ddim_cli.data import load_digits_arrays as f; f(); print('sklearn' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "False"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # no table to read: load_digits
    images, labels = load_digits_arrays()
    assert np.array_equal(images, reference.images) and np.array_equal(labels, reference.target)


def test_nearest_upscaling_of_the_digits_is_lossless_and_bilinear_blurs():
    from sklearn.datasets import load_digits

    originals = torch.tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 8 - 1  # 0..16 -> [-1, 1]
    nearest = build_dataset(DataConfig(dataset="digits", image_size=16, interpolation="nearest"))
    torch.testing.assert_close(torch.nn.functional.avg_pool2d(nearest.images, 2), originals, rtol=0, atol=1e-6)
    assert torch.equal(nearest.images[:, :, ::2, ::2], nearest.images[:, :, 1::2, 1::2])  # 2x2 blocks
    # auto is bilinear for the digits (what checkpoints without the key were trained on): averaging
    # each 2x2 block of bilinear x2 gives [1/8, 3/4, 1/8] along each axis, not the digit.
    auto = build_dataset(DataConfig(dataset="digits", image_size=16))
    bilinear = build_dataset(DataConfig(dataset="digits", image_size=16, interpolation="bilinear"))
    assert torch.equal(auto.images, bilinear.images)
    kernel = torch.tensor([1 / 8, 3 / 4, 1 / 8])
    blur = (kernel[:, None] * kernel[None, :]).view(1, 1, 3, 3)
    inner = torch.nn.functional.conv2d(originals, blur)  # away from the border (edge padding differs)
    averaged = torch.nn.functional.avg_pool2d(bilinear.images, 2)[:, :, 1:-1, 1:-1]
    torch.testing.assert_close(averaged, inner, rtol=0, atol=1e-5)


def make_folder(root, sizes=((40, 30, "RGB"), (20, 20, "L"), (33, 50, "RGBA"))):
    root.mkdir(parents=True, exist_ok=True)
    for i, (w, h, mode) in enumerate(sizes):
        Image.new(mode, (w, h), color=(i * 60 if mode == "L" else (i * 60, 10, 200, 255)[: len(mode)])).save(
            root / f"img{i}.png"
        )


def test_folder_images_are_resized_center_cropped_and_converted(tmp_path):
    make_folder(tmp_path / "imgs")
    dataset = build_dataset(DataConfig(dataset="folder", root=str(tmp_path / "imgs"), image_size=8, channels=3))
    assert len(dataset) == 3 and dataset.num_classes is None
    for i in range(3):
        image, label = dataset[i]
        assert image.shape == (3, 8, 8) and label == NO_LABEL
        assert -1 <= image.min() and image.max() <= 1
    gray = build_dataset(DataConfig(dataset="folder", root=str(tmp_path / "imgs"), image_size=4, channels=1))
    assert gray[0][0].shape == (1, 4, 4)


def test_the_image_transform_gives_torchvisions_floats_without_importing_torchvision():
    from torchvision import transforms

    rng = np.random.default_rng(0)
    sources = [  # (width, height, mode): tall, wide, square, already the size; modes to convert
        (5, 7, "L"),
        (7, 5, "RGB"),
        (13, 9, "RGBA"),
        (8, 8, "L"),
        (8, 8, "RGB"),
        (31, 20, "P"),
        (16, 33, "LA"),
        (9, 12, "1"),
        (40, 40, "RGB"),
        (3, 4, "L"),
    ]
    for (width, height, mode), size, channels, resize in itertools.product(
        sources, (8, 11), (1, 3), ("nearest", "bilinear", "bicubic")
    ):
        pixels = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
        image = Image.fromarray(pixels, "RGBA").convert(mode)
        theirs = transforms.Compose(
            [
                transforms.Resize(size, interpolation=transforms.InterpolationMode(resize), antialias=True),
                transforms.CenterCrop(size),
                transforms.ToTensor(),
                transforms.Normalize([0.5] * channels, [0.5] * channels),
            ]
        )(image.convert("L" if channels == 1 else "RGB"))
        ours = image_transform(size, channels, resize)
        assert torch.equal(ours(image), theirs), (width, height, mode, size, channels, resize)
    assert torch.equal(pickle.loads(pickle.dumps(ours))(image), theirs)  # DataLoader workers pickle it
    # ... and a command that reads images does not pay for torchvision's import
    check = "from PIL import Image; from ddim_cli.data import image_transform; import sys; "
    check += "image_transform(8, 3)(Image.new('L', (5, 7))); print('torchvision' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", check], capture_output=True, text=True).stdout == "False\n"


def test_folder_skips_unreadable_files_with_one_warning_naming_them(tmp_path):
    make_folder(tmp_path / "imgs" / "nested")
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = build_dataset(DataConfig(dataset="folder", root=str(tmp_path / "imgs"), image_size=8, channels=3))
    assert len(dataset) == 3
    assert len(caught) == 1
    assert "broken.png" in str(caught[0].message) and "notes.txt" in str(caught[0].message)
    with pytest.raises(DataError, match="broken.png"):
        build_dataset(DataConfig(dataset="folder", root=str(tmp_path / "imgs"), image_size=8, strict=True))


def test_folder_sub_folders_are_classes(tmp_path):
    make_folder(tmp_path / "imgs" / "cats")
    make_folder(tmp_path / "imgs" / "dogs", sizes=((16, 16, "RGB"),))
    dataset = build_dataset(DataConfig(dataset="folder", root=str(tmp_path / "imgs"), image_size=8, channels=3))
    assert dataset.num_classes == 2
    assert sorted(dataset[i][1] for i in range(len(dataset))) == [0, 0, 0, 1]


def test_empty_or_missing_folders_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no images"):
        build_dataset(DataConfig(dataset="folder", root=str(tmp_path / "empty")))
    with pytest.raises(DataError, match="is not a directory"):
        build_dataset(DataConfig(dataset="folder", root=str(tmp_path / "missing")))


def test_missing_cifar10_without_download_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match="data.download: true"):
        build_dataset(DataConfig(dataset="cifar10", root=str(tmp_path), image_size=32, channels=3))
    assert not any(tmp_path.iterdir())  # nothing was downloaded or written


def test_cifar10_reads_torchvision_batches(tmp_path, monkeypatch):
    import torchvision.datasets.cifar

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), "labels": [1, 7]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [f"c{i}" for i in range(10)]}))
    # torchvision checks the real files' md5 sums; ours are fakes of the same format.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda path, md5=None: True)
    dataset = build_dataset(DataConfig(dataset="cifar10", root=str(tmp_path), image_size=32, channels=3))
    assert len(dataset) == 10 and dataset.num_classes == 10
    image, label = dataset[1]
    assert image.shape == (3, 32, 32) and label == 7 and -1 <= image.min() and image.max() <= 1


def stream_config(dataset: str, root, **data) -> Config:
    return config_from_dict(
        {
            "data": {"dataset": dataset, "root": str(root), "image_size": 8, "channels": 3, **data},
            "model": {"ch": 32, "ch_mult": [1], "num_classes": 2},
            "train": {"batch_size": 6, "seed": 3},
        }
    )


def labelled_folder(root, count=21):
    rng = np.random.default_rng(0)
    for i in range(count):
        (root / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, size=(11, 9, 3), dtype=np.uint8)  # resized to 8x8 bicubically
        Image.fromarray(pixels).save(root / f"class{i % 2}" / f"{i}.png")


@pytest.mark.parametrize("dataset", ["folder", "digits"])
@pytest.mark.parametrize(("start", "rank", "world"), [(0, 0, 1), (5, 1, 2)])
def test_the_dataset_held_on_the_device_gives_the_dataloaders_batches_bit_for_bit(
    tmp_path, dataset, start, rank, world
):
    labelled_folder(tmp_path)
    config = stream_config(dataset, tmp_path)
    data = build_dataset(config.data)
    held = DeviceImages.decode(data, 0, torch.device("cpu"))
    # 8-bit pixels are held as uint8 (a quarter of the floats); the upscaled digits as floats
    assert held.images.dtype == (torch.uint8 if dataset == "folder" else torch.float32)
    steps = 3 * (len(data) // 6) + 1  # across epoch boundaries, with their new permutations
    loader = _loader_batches(data, config, start, rank, world, torch.device("cpu"))
    on_device = _on_device_batches(held, config, start, rank, world)
    for a, b in itertools.islice(zip(loader, on_device, strict=True), steps):
        assert a[0].dtype == b[0].dtype == torch.float32 and a[0].shape == (6 // world, 3, 8, 8)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_the_data_stream_holds_what_fits_and_checks_labels_once(tmp_path, monkeypatch):
    labelled_folder(tmp_path)
    cpu = torch.device("cpu")
    config = stream_config("folder", tmp_path)
    data = build_dataset(config.data)
    assert holds_on_device(data, config, cpu)
    assert not holds_on_device(data, stream_config("folder", tmp_path, on_device=False), cpu)
    monkeypatch.setattr(training_data, "ON_DEVICE_LIMIT_BYTES", len(data) * 3 * 8 * 8 - 1)
    assert not holds_on_device(data, config, cpu)
    assert holds_on_device(data, stream_config("folder", tmp_path, on_device=True), cpu)

    for child in tmp_path.iterdir():  # the same images, without class folders: no labels
        for image in child.iterdir():
            image.rename(tmp_path / image.name)
        child.rmdir()
    with pytest.raises(TrainingError, match="a class-conditional model needs labelled data"):
        data_batches(build_dataset(config.data), config, 0, 0, 1, cpu)  # before any batch is drawn


def test_16_bit_grayscale_reads_as_its_8_bit_twin_not_white(tmp_path):
    # Pillow opens a 16-bit PNG as I;16, and its convert("L") clips at 255: every pixel above
    # 255/65535 of full scale turned white, in training folders, inputs, masks and FID folders.
    from ddim_cli.fid import source_batches
    from ddim_cli.images import load_mask

    eight = np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)
    (tmp_path / "8").mkdir(), (tmp_path / "16").mkdir()
    Image.fromarray(eight).save(tmp_path / "8" / "a.png")
    Image.fromarray(eight.astype(np.uint16) * 257).save(tmp_path / "16" / "a.png")  # 0..65535, the same levels
    with Image.open(tmp_path / "16" / "a.png") as sixteen:
        assert sixteen.mode == "I;16"
    for channels in (1, 3):
        transform = image_transform(16, channels)
        with Image.open(tmp_path / "8" / "a.png") as a, Image.open(tmp_path / "16" / "a.png") as b:
            assert torch.equal(transform(a), transform(b))
    folders = [next(source_batches(tmp_path / name, 4)) for name in ("8", "16")]
    assert np.array_equal(*folders) and folders[0].std() > 50
    assert torch.equal(load_mask(tmp_path / "8" / "a.png", 16), load_mask(tmp_path / "16" / "a.png", 16))
