"""Drives pdctl's proxy with the real OpenAI Python client: chat and completions, plain and
streamed. Usage: openai_client.py BASE_URL MODEL. Prints one line per check; exits non-zero on
the first failure."""
import sys

from openai import OpenAI

base, model = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base, api_key="unused", max_retries=0, timeout=30)

chat = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "Say hello"}], max_tokens=5
)
assert chat.choices[0].message.content, chat
assert chat.usage.completion_tokens == 5, chat.usage
print("chat ok")

parts = []
usage = None
for chunk in client.chat.completions.create(
    model=model,
    messages=[{"role": "user", "content": "Stream please"}],
    max_tokens=4,
    stream=True,
    stream_options={"include_usage": True},
):
    if chunk.choices and chunk.choices[0].delta.content:
        parts.append(chunk.choices[0].delta.content)
    if chunk.usage:
        usage = chunk.usage
assert len(parts) == 4, parts
assert usage is not None and usage.completion_tokens == 4, usage
print("chat stream ok")

completion = client.completions.create(model=model, prompt="Once upon a time", max_tokens=3)
assert completion.choices[0].text, completion
print("completion ok")

streamed = [c.choices[0].text for c in client.completions.create(
    model=model, prompt="Count", max_tokens=3, stream=True) if c.choices]
assert len(streamed) == 3, streamed
print("completion stream ok")
