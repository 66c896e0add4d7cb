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
    images = torch.arange(6 * 3 * 32 * 32, dtype=torch.int64).remainder(251).to(torch.uint8).view(6, 3, 32, 32)
    train_set = data.AugmentedTrainSet(images, torch.arange(6) * 10)
    indices = torch.tensor([4, 1, 1, 5])
    out1, labels = train_set.batch(indices, data.generator(0, "augment", 1, 2))
    out2, _ = train_set.batch(indices, data.generator(0, "augment", 1, 2))
    assert torch.equal(out1, out2)
    assert out1.shape == (4, 3, 32, 32) and out1.dtype == torch.uint8
    assert labels.tolist() == [40, 10, 10, 50]
    # Each output image is a zero-padded shift of its own input, possibly mirrored: find it.
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    for out, index in zip(out1, indices.tolist()):
        candidates = [padded[index, :, dy:dy + 32, dx:dx + 32] for dy in range(9) for dx in range(9)]
        assert any(torch.equal(out, c) or torch.equal(out, c.flip(2)) for c in candidates)
    varied = {train_set.batch(indices, data.generator(0, "augment", 1, k))[0].sum().item() for k in range(8)}
    assert len(varied) > 1


def test_augmentation_matches_pad_crop_flip_done_one_image_at_a_time():
    """The one-op gather against the plain recipe: draw offsets and flips, pad, crop, mirror."""
    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8, generator=data.generator(3, "images"))
    train_set = data.AugmentedTrainSet(images, torch.zeros(5, dtype=torch.int64))
    indices = torch.tensor([2, 0, 4, 4, 3, 1, 0, 2])
    for position in range(6):
        out, _ = train_set.batch(indices, data.generator(0, "augment", 0, position))
        gen = data.generator(0, "augment", 0, position)
        offsets = torch.randint(0, 9, (2, len(indices)), generator=gen)
        flips = torch.rand(len(indices), generator=gen) < 0.5
        for k, index in enumerate(indices.tolist()):
            dy, dx = offsets[:, k].tolist()
            expected = torch.nn.functional.pad(images[index], (4, 4, 4, 4))[:, dy:dy + 32, dx:dx + 32]
            if flips[k]:
                expected = expected.flip(2)
            assert torch.equal(out[k], expected), (position, k)


def test_normalise_uses_cifar_statistics():
    transform = data.BatchTransform(torch.device("cpu"))
    mean_image = torch.tensor([round(m * 255) for m in data.MEAN], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 32, 32)
    assert transform.normalise(mean_image).abs().max().item() < 0.01
