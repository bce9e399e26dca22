"""The question the chat tests ask the starter model, worded so that its greedy answer does not hang on a tie.

Asked bare, "What is the capital of France?" leaves SmolLM2-135M (Q4_1) 0.13 logits between starting "The" and
"La", and llama.cpp's kernel path picks the winner: on an AVX2-only AMD CPU the batched prompt without flash
attention answers "La femme de France…", while one token at a time or flash attention answers Paris. With
"Answer in one sentence." the margin is 1.6 to 1.8 logits on every path tried (batched, one token at a time, flash
attention, one and two threads), and each answers "The capital of France is Paris."
"""

SYSTEM = "You are a helpful assistant."
CAPITAL_QUESTION = "What is the capital of France? Answer in one sentence."
