"""`qdesk demo`: the headless story on the bundled starter model, as far as this version goes."""

from __future__ import annotations

import time

from qdesk.info import read_model_info, render_text
from qdesk.starter import starter_model_path

DEMO_QUESTION = "What is the capital of France?"
DEMO_SYSTEM_PROMPT = "You are a helpful assistant."


def run_demo() -> int:
    path = starter_model_path()
    print("qdesk demo: the starter model\n")
    print(render_text(read_model_info(path)))
    print(f"\nAsking it: {DEMO_QUESTION}")
    answer, seconds = _ask(str(path), DEMO_QUESTION)
    print(f"Answer ({seconds:.1f} s): {answer}\n")
    print(
        "Next: convert a Hugging Face checkpoint with `qdesk convert CHECKPOINT_FOLDER`.\n"
        "Quantization, evaluation and side-by-side compare join this demo as they land."
    )
    return 0


def _ask(model_path: str, question: str) -> tuple[str, float]:
    from llama_cpp import Llama

    started = time.monotonic()
    model = Llama(model_path=model_path, n_ctx=512, seed=0, verbose=False)
    reply = model.create_chat_completion(
        messages=[{"role": "system", "content": DEMO_SYSTEM_PROMPT}, {"role": "user", "content": question}],
        temperature=0.0,
        max_tokens=48,
    )
    content = str(reply["choices"][0]["message"]["content"]).strip()
    return content, time.monotonic() - started
