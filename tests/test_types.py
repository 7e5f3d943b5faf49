"""Public types: Tinker names and behaviour, coercion by key, validation that names the field."""

import msgspec
import numpy as np
import pytest
import torch

import tinker
from tinker import wire
from tinker.types import AdamParams, Datum, LoraConfig, ModelInput, SamplingParams, TensorData


def test_public_surface_is_pinned():
    public = {name for name in dir(tinker) if not name.startswith("_")}
    exported = set(tinker.__all__)
    assert sorted(tinker.__all__) == tinker.__all__
    assert exported <= public
    modules = {"cli", "errors", "futures", "rest_client", "sampling_client", "service_client", "training_client", "types", "validation", "wire"}
    assert public - exported - modules == {"annotations"} or public - exported - modules == set()


class TestModelInput:
    def test_from_ints_round_trip(self):
        mi = ModelInput.from_ints([5, 6, 7])
        assert mi.to_ints() == [5, 6, 7]
        assert mi.length == 3

    def test_append_returns_new_objects(self):
        mi = ModelInput.from_ints([1])
        longer = mi.append_int(2).append(tinker.EncodedTextChunk(tokens=[3, 4]))
        assert mi.length == 1 and longer.to_ints() == [1, 2, 3, 4]
        assert ModelInput.empty().length == 0

    def test_negative_token_named(self):
        with pytest.raises(ValueError, match=r"tokens\[1\]: expected a non-negative int"):
            ModelInput.from_ints([1, -1])


class TestTensorData:
    def test_numpy_round_trip_keeps_shape_and_dtype(self):
        arr = np.arange(6, dtype=np.float64).reshape(2, 3)
        td = TensorData.from_numpy(arr)
        assert td.dtype == "float32" and td.shape == [2, 3]
        np.testing.assert_array_equal(td.to_numpy(), arr.astype(np.float32))

    def test_torch_bf16_widened(self):
        td = TensorData.from_torch(torch.tensor([1.5, 2.0], dtype=torch.bfloat16))
        assert td.dtype == "float32"
        assert td.to_torch().dtype == torch.float32

    def test_ints(self):
        td = TensorData.from_numpy(np.array([1, 2], dtype=np.int32))
        assert td.dtype == "int64" and td.tolist() == [1, 2]

    @pytest.mark.parametrize(
        ("kwargs", "message"),
        [
            ({"data": [1.0, float("nan")], "dtype": "float32"}, r"data\[1\]: expected a finite float"),
            ({"data": [1.0, 2.5], "dtype": "int64"}, r"data\[0\]: expected an int"),
            ({"data": [1, 2, 3], "dtype": "int64", "shape": [2, 2]}, "shape: expected dims whose product"),
        ],
    )
    def test_invalid(self, kwargs, message):
        with pytest.raises(ValueError, match=message):
            TensorData(**kwargs)


class TestDatum:
    def test_lists_coerced_by_key(self):
        d = Datum(
            model_input=ModelInput.from_ints([1, 2]),
            loss_fn_inputs={"target_tokens": [2, 3], "weights": [1, 0], "advantages": [0.5, 0.5]},
        )
        assert d.loss_fn_inputs["target_tokens"].dtype == "int64"
        assert d.loss_fn_inputs["weights"].dtype == "float32"

    def test_numpy_and_torch_accepted_for_custom_keys(self):
        d = Datum(
            model_input=ModelInput.from_ints([1, 2]),
            loss_fn_inputs={"mine": np.zeros(2), "other": torch.ones(2, dtype=torch.int32)},
        )
        assert d.loss_fn_inputs["mine"].dtype == "float32"
        assert d.loss_fn_inputs["other"].dtype == "int64"

    def test_plain_list_for_unknown_key_rejected(self):
        with pytest.raises(KeyError, match="mine"):
            Datum(model_input=ModelInput.from_ints([1]), loss_fn_inputs={"mine": [1.0]})

    def test_survives_the_wire(self):
        d = Datum(model_input=ModelInput.from_ints([1, 2]), loss_fn_inputs={"target_tokens": [2, 3], "weights": [1.0, 1.0]})
        assert msgspec.msgpack.decode(msgspec.msgpack.encode(d), type=Datum) == d


class TestParams:
    def test_adam_defaults_match_tinker(self):
        p = AdamParams()
        assert (p.learning_rate, p.beta1, p.beta2, p.eps, p.weight_decay, p.grad_clip_norm) == (
            1e-4, 0.9, 0.95, 1e-12, 0.0, 0.0,
        )

    @pytest.mark.parametrize(
        ("kwargs", "field"),
        [({"learning_rate": -1.0}, "learning_rate"), ({"beta1": 1.0}, "beta1"), ({"eps": 0.0}, "eps")],
    )
    def test_adam_invalid_named(self, kwargs, field):
        with pytest.raises(ValueError, match=f"^{field}: expected"):
            AdamParams(**kwargs)

    @pytest.mark.parametrize(
        ("kwargs", "field"),
        [
            ({"temperature": -0.1}, "temperature"),
            ({"top_p": 0.0}, "top_p"),
            ({"top_k": 0}, "top_k"),
            ({"max_tokens": 0}, "max_tokens"),
            ({"stop": [""]}, r"stop\[0\]"),
        ],
    )
    def test_sampling_invalid_named(self, kwargs, field):
        with pytest.raises(ValueError, match=f"^{field}: expected"):
            SamplingParams(**kwargs)

    def test_stop_split(self):
        p = SamplingParams(stop=["\n", 7])
        assert p.stop_strings() == ["\n"] and p.stop_token_ids() == [7]

    def test_lora_config(self):
        with pytest.raises(ValueError, match="rank: expected"):
            LoraConfig(rank=0)
        with pytest.raises(ValueError, match="at least one True"):
            LoraConfig(train_mlp=False, train_attn=False, train_unembed=False)


class TestWire:
    def test_request_validation_names_path(self):
        bad = wire.encoder.encode(
            {"type": "OptimStep", "model_id": "m", "seq_id": 1, "adam_params": {"learning_rate": -1.0}}
        )
        with pytest.raises(msgspec.ValidationError, match=r"learning_rate.*\$\.adam_params"):
            wire.request_decoder.decode(bad)

    def test_unknown_field_rejected(self):
        bad = wire.encoder.encode({"type": "GetInfo", "model_id": "m", "surprise": 1})
        with pytest.raises(msgspec.ValidationError, match="surprise"):
            wire.request_decoder.decode(bad)

    def test_every_request_has_a_response_type(self):
        import typing

        assert set(typing.get_args(wire.Request)) == set(wire.RESPONSE_TYPES)
