"""Learners inside a real Lightning Trainer, without the command line."""

import pytest
import torch
from hydra import compose, initialize_config_dir
from learner_checkpoints import quiet_trainer

from metalab.algorithms import ALGORITHMS
from metalab.runner import build_datamodule
from metalab.settings import CONFIG_DIR
from metalab.validation import resolve


def sinusoid_setup(tmp_path, **overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"paths.run_dir={tmp_path}",
                f"paths.cache_dir={tmp_path}",
                *(f"{k}={v}" for k, v in overrides.items()),
            ],
        )
    config = resolve(cfg)
    datamodule = build_datamodule(config)
    datamodule.setup("fit")
    torch.manual_seed(0)
    model = ALGORITHMS[config["algorithm"]["name"]].from_config(
        config, list(datamodule.input_shape), datamodule.task_type
    )
    return model, datamodule


# The learners for regression beside MAML (the default) join the shared tests here.
REGRESSION = ["maml", "pretrained"]


@pytest.mark.parametrize("algorithm", REGRESSION)
@pytest.mark.parametrize("stage", ["validate", "test"])
def test_evaluation_works_under_lightnings_default_inference_mode(tmp_path, stage, algorithm):
    model, datamodule = sinusoid_setup(tmp_path, test_episodes=40, val_episodes=40, algorithm=algorithm)
    results = []
    for inference_mode in (True, False):  # True is Lightning's default for validate/test
        metrics = getattr(quiet_trainer(inference_mode=inference_mode), stage)(
            model, datamodule=datamodule, verbose=False
        )[0]
        results.append(metrics)
    prefix = "val" if stage == "validate" else "test"
    assert results[0] == results[1]
    assert results[0][f"{prefix}/mse"] < results[0][f"{prefix}/mse_before"] * 2  # adaptation ran and is finite


@pytest.mark.parametrize("algorithm", REGRESSION)
def test_training_moves_parameters_and_logs(tmp_path, algorithm):
    model, datamodule = sinusoid_setup(tmp_path, **{"trainer.max_steps": 5, "algorithm": algorithm})
    before = [p.detach().clone() for p in model.parameters()]
    trainer = quiet_trainer(max_steps=5, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=datamodule)
    assert trainer.global_step == 5 and model.train_tasks == 5 * datamodule.meta_batch_size
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert {"train/loss", "train/mse", "train/lr", "train/tasks_per_sec"} <= set(trainer.callback_metrics)


def test_conv4_finn_omniglot_network_strides_with_tensorflow_same_padding():
    """cbfinn/maml's Omniglot net: 3×3 convolutions of stride 2, 'SAME' padding (TensorFlow pads
    an odd total after, so output pixel i reads input rows 2i..2i+2), no max-pooling, the last
    map averaged over its positions (utils.py conv_block, maml.py forward_conv)."""
    from metalab.backbones.conv4 import Conv4

    net = Conv4((1, 28, 28), hidden_channels=4, pooled_blocks=0, stride=2, global_average=True)
    sizes, x = [], torch.zeros(2, 1, 28, 28)
    for block in net.layers:
        x = block(x)
        sizes.append(x.shape[-1])
    assert sizes == [14, 7, 4, 2] and net.out_features == 4
    conv = net.layers[0][0]
    with torch.no_grad():  # a kernel that reads only its top-left tap
        conv.weight.zero_()
        conv.weight[:, :, 0, 0] = 1.0
        conv.bias.zero_()
    image = torch.randn(1, 1, 28, 28)
    torch.testing.assert_close(conv(image)[0, 0], image[0, 0, 0::2, 0::2])  # no padding before: row 2i
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in net.modules())
    features = torch.randn(3, 4, 2, 2)
    torch.testing.assert_close(net.pooled(features), features.mean((2, 3)))
