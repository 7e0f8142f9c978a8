"""LiteLLM: `gemini/…` with api_base `${BASE}/gemini/v1beta`, `dashscope/…` with
`${BASE}/dashscope/v1`. Dummy keys."""
import os

import litellm

base = os.environ["BASE"]
r = litellm.completion(
    model="gemini/gemini-2.5-flash",
    api_base=f"{base}/gemini/v1beta",
    api_key="unused",
    messages=[{"role": "user", "content": "hi"}],
)
assert r.choices[0].message.content == "Hello from the fake Gemini.", r
r = litellm.completion(
    model="dashscope/qwen-plus",
    api_base=f"{base}/dashscope/v1",
    api_key="unused",
    messages=[{"role": "user", "content": "hi"}],
)
assert r.choices[0].message.content == "Hello from the fake upstream.", r
print("litellm ok")
