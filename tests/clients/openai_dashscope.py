"""The official openai SDK against the dashscope preset (driven by tests/clients.rs).

BASE_URL is tokenrelay's `/dashscope/v1`; the SDK holds a dummy key and tokenrelay sends a
pooled DashScope key as `Authorization: Bearer`.
"""
import os

import openai

client = openai.OpenAI(base_url=os.environ["BASE_URL"], api_key="dummy-key-the-sdk-needs", max_retries=0)
reply = client.chat.completions.create(model="qwen-plus", messages=[{"role": "user", "content": "hi"}])
assert reply.choices[0].message.content == "Hello from the fake upstream.", reply
chunks = client.chat.completions.create(
    model="qwen-plus", messages=[{"role": "user", "content": "hi"}], stream=True
)
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
assert text == "Hello, streamed.", text
print("openai dashscope ok")
