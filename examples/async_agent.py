"""An async agent that trains and samples without ever blocking its own event loop.

    python examples/async_agent.py --model tiny-llama

The agent's loop keeps serving "user requests" (a ticker here) while it fine-tunes a LoRA
adapter and queries both the base model and the adapter: every primitive is awaited, so the
loop stays responsive however long the backend takes.
"""

import argparse
import asyncio
import time

import tinker
from tinker import AdamParams, Datum, ModelInput, SamplingParams

FACTS = [
    "Meeting day: Tuesday at noon.",
    "Password: purple rain.",
    "Cat name: Miso the grey.",
]


async def heartbeat(stats: dict[str, float]) -> None:
    """Stands in for the rest of the agent: it must keep running while training happens."""
    while True:
        stats["ticks"] += 1
        await asyncio.sleep(0.01)


def fact_datum(tokenizer, text: str) -> Datum:
    tokens = [tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False)]
    return Datum(
        model_input=ModelInput.from_ints(tokens[:-1]),
        loss_fn_inputs={"target_tokens": tokens[1:], "weights": [1.0] * (len(tokens) - 1)},
    )


async def main(model: str, steps: int) -> dict[str, float]:
    stats = {"ticks": 0.0}
    ticker = asyncio.create_task(heartbeat(stats))
    service = tinker.ServiceClient()
    training = await service.create_lora_training_client(model, rank=8, seed=0)
    tokenizer = training.get_tokenizer()
    data = [fact_datum(tokenizer, fact) for fact in FACTS]

    start = time.perf_counter()
    base = service.create_sampling_client(base_model=model)
    base_answer = base.sample(ModelInput.from_ints(data[0].model_input.to_ints()[:3]), 1, SamplingParams(max_tokens=8))
    losses = []
    for _ in range(steps):
        fb = training.forward_backward(data, "cross_entropy")
        optim = training.optim_step(AdamParams(learning_rate=5e-3))
        losses.append((await fb).metrics["loss:sum"])
        await optim
    sampler = await training.save_weights_and_get_sampling_client()
    prompts = [ModelInput.from_ints(d.model_input.to_ints()[:2]) for d in data]
    answers = await asyncio.gather(
        *(sampler.sample(p, 1, SamplingParams(max_tokens=12, temperature=0.0)) for p in prompts)
    )
    await base_answer
    elapsed = time.perf_counter() - start
    ticker.cancel()

    for prompt, answer in zip(prompts, answers, strict=True):
        tokens = prompt.to_ints() + answer.sequences[0].tokens
        print(f"  {tokenizer.decode(tokens, skip_special_tokens=True)!r}")
    print(f"loss {losses[0]:.2f} -> {losses[-1]:.2f} in {steps} steps, {elapsed:.1f}s")
    print(f"the agent's loop ticked {int(stats['ticks'])} times meanwhile (it was never blocked)")
    return {"first_loss": losses[0], "last_loss": losses[-1], "ticks": stats["ticks"]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="HuggingFaceTB/SmolLM2-135M-Instruct")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    asyncio.run(main(args.model, args.steps))
