"""The data pipeline: the real CIFAR-10 loader on files in the real format, determinism, augmentation."""

import os

import pytest
import torch

from spotrunner import data
from spotrunner.errors import ConfigError
from tests.support.cifar import write_cifar10


def test_cifar10_on_disk_format_round_trip(tmp_path):
    checksums, written = write_cifar10(str(tmp_path))
    dataset = data.load_cifar10(str(tmp_path), download=False, checksums=checksums)
    assert dataset.train_images.dtype == torch.uint8
    assert dataset.train_images.shape == (20, 3, 32, 32)
    assert dataset.test_images.shape == (6, 3, 32, 32)
    # A row is 1024 red, 1024 green, 1024 blue values, each plane row-major.
    expected = torch.from_numpy(written["train_rows"]).view(20, 3, 32, 32)
    assert torch.equal(dataset.train_images, expected)
    assert dataset.train_labels.tolist() == written["train_labels"]
    assert torch.equal(dataset.test_images, torch.from_numpy(written["test_rows"]).view(6, 3, 32, 32))
    assert dataset.test_labels.tolist() == written["test_labels"]
    row = written["train_rows"][7]
    assert dataset.train_images[7, 2, 5, 9].item() == row[2 * 1024 + 5 * 32 + 9]


def test_cifar10_files_failing_their_checksum_are_refused(tmp_path):
    checksums, _ = write_cifar10(str(tmp_path))
    path = os.path.join(tmp_path, "cifar-10-batches-py", "data_batch_3")
    with open(path, "r+b") as handle:
        handle.seek(200)
        handle.write(b"\x00\x01\x02")
    with pytest.raises(ConfigError, match="fails its checksums"):
        data.load_cifar10(str(tmp_path), download=False, checksums=checksums)


def test_official_checksums_refuse_files_that_are_not_the_real_archive(tmp_path):
    write_cifar10(str(tmp_path))
    with pytest.raises(ConfigError, match="--data-dir"):
        data.load_cifar10(str(tmp_path), download=False)


def test_synthetic_is_deterministic_and_seed_dependent():
    first, again, other = data.synthetic(300, seed=1), data.synthetic(300, seed=1), data.synthetic(300, seed=2)
    assert torch.equal(first.train_images, again.train_images)
    assert torch.equal(first.test_labels, again.test_labels)
    assert not torch.equal(first.train_images, other.train_images)
    assert first.train_images.shape == (300, 3, 32, 32) and first.train_images.dtype == torch.uint8
    assert set(first.train_labels.tolist()) == set(range(10))


def test_epoch_order_depends_on_seed_and_epoch_only():
    assert torch.equal(data.epoch_order(100, 3, 4), data.epoch_order(100, 3, 4))
    assert not torch.equal(data.epoch_order(100, 3, 4), data.epoch_order(100, 3, 5))
    assert sorted(data.epoch_order(100, 3, 4).tolist()) == list(range(100))


def test_ranks_split_each_global_batch_without_overlap():
    order = data.epoch_order(50, 0, 0)
    shards = [data.batch_indices(order, 1, 8, rank, 2) for rank in range(2)]
    together = torch.cat(shards).sort().values
    assert torch.equal(together, order[16:32].sort().values)
    assert not set(shards[0].tolist()) & set(shards[1].tolist())


def test_augmentation_crops_and_flips_reproducibly():
    transform = data.BatchTransform(torch.device("cpu"))
    images = torch.arange(2 * 3 * 32 * 32, dtype=torch.int64).remainder(251).to(torch.uint8).view(2, 3, 32, 32)
    out1 = transform.augment(images, data.generator(0, "augment", 1, 2))
    out2 = transform.augment(images, data.generator(0, "augment", 1, 2))
    assert torch.equal(out1, out2)
    assert out1.shape == images.shape and out1.dtype == torch.uint8
    # Each output image is a padded shift of the input, possibly mirrored: find the shift.
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    for i in range(2):
        candidates = [padded[i, :, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
        assert any(torch.equal(out1[i], c) or torch.equal(out1[i], c.flip(2)) for c in candidates)
    varied = {transform.augment(images, data.generator(0, "augment", 1, k)).sum().item() for k in range(8)}
    assert len(varied) > 1


def test_normalise_uses_cifar_statistics():
    transform = data.BatchTransform(torch.device("cpu"))
    mean_image = torch.tensor([round(m * 255) for m in data.MEAN], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 32, 32)
    assert transform.normalise(mean_image).abs().max().item() < 0.01
