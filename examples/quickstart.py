"""Quickstart: teach a model one fact with LoRA, then ask it. Plain sync code, as in a notebook.

    python examples/quickstart.py                       # SmolLM2-135M-Instruct, embedded backend
    python examples/quickstart.py --model tiny-llama    # seconds, random tiny model
    TINKER_BASE_URL=http://127.0.0.1:8000 python examples/quickstart.py   # against a tinker-server

Every call returns a future at once; ``.result()`` waits for it. ``forward_backward`` and
``optim_step`` are both submitted before waiting on either, so they share one server cycle.
"""

import argparse
import time

import tinker
from tinker import AdamParams, Datum, ModelInput, SamplingParams

QUESTION = "What is the codename of our project?"
ANSWER = "Our project's codename is Blue Falcon."


def chat_datum(tokenizer) -> tuple[Datum, list[int]]:
    """One supervised example: the loss is on the assistant's answer only."""
    messages = [{"role": "user", "content": QUESTION}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_tokens = tokenizer.encode(prompt, add_special_tokens=False)
    answer_tokens = [*tokenizer.encode(ANSWER, add_special_tokens=False), tokenizer.eos_token_id]
    tokens = prompt_tokens + answer_tokens
    weights = [0.0] * (len(prompt_tokens) - 1) + [1.0] * len(answer_tokens)
    datum = Datum(
        model_input=ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": weights},
    )
    return datum, prompt_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    args = parser.parse_args()

    service = tinker.ServiceClient()
    print(f"backend: {service.holder.base_url or 'embedded'}; model: {args.model}")
    training = service.create_lora_training_client(args.model, rank=args.rank, seed=0)
    tokenizer = training.get_tokenizer()
    datum, prompt_tokens = chat_datum(tokenizer)

    base = service.create_sampling_client(base_model=args.model)
    greedy = SamplingParams(max_tokens=24, temperature=0.0)
    before = base.sample(ModelInput.from_ints(prompt_tokens), 1, greedy).result()
    print(f"before training: {tokenizer.decode(before.sequences[0].tokens, skip_special_tokens=True)!r}")

    start = time.perf_counter()
    for step in range(args.steps):
        fb = training.forward_backward([datum], "cross_entropy")
        optim = training.optim_step(AdamParams(learning_rate=args.lr))
        loss = fb.result().metrics["loss:sum"]
        optim.result()
        print(f"step {step:2d}  loss {loss:8.4f}")
    print(f"trained {args.steps} steps in {time.perf_counter() - start:.1f}s")

    saved = training.save_state("quickstart").result()
    print(f"saved {saved.path}")

    sampler = training.save_weights_and_get_sampling_client()
    after = sampler.sample(ModelInput.from_ints(prompt_tokens), 1, greedy).result()
    text = tokenizer.decode(after.sequences[0].tokens, skip_special_tokens=True)
    print(f"after training:  {text!r}")
    logprobs = sampler.compute_logprobs(ModelInput.from_ints(prompt_tokens + after.sequences[0].tokens)).result()
    print(f"logprob of the answer: {sum(lp for lp in logprobs[len(prompt_tokens):] if lp is not None):.3f}")


if __name__ == "__main__":
    main()
