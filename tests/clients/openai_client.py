"""The official openai SDK through tokenrelay (driven by tests/clients.rs).

BASE_URL points at a tokenrelay with a working Qwen credential; DEAD_BASE_URL at one whose
only credential is revoked. The SDK holds a dummy key; tokenrelay attaches the token.
"""
import os
import sys

import openai

ok = openai.OpenAI(base_url=os.environ["BASE_URL"], api_key="dummy-key-the-sdk-needs", max_retries=0)

reply = ok.chat.completions.create(model="qwen3-coder-plus", messages=[{"role": "user", "content": "hi"}])
assert reply.choices[0].message.content == "Hello from the fake upstream.", reply

chunks = ok.chat.completions.create(
    model="qwen3-coder-plus", messages=[{"role": "user", "content": "hi"}], stream=True
)
text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
assert text == "Hello, streamed.", text

dead = openai.OpenAI(base_url=os.environ["DEAD_BASE_URL"], api_key="dummy", max_retries=0)
try:
    dead.chat.completions.create(model="qwen3-coder-plus", messages=[{"role": "user", "content": "hi"}])
except openai.APIStatusError as e:
    assert e.status_code == 503, e.status_code
    assert isinstance(e, openai.InternalServerError), type(e)
    assert "no credential of provider qwen could serve this request" in e.message, e.message
    assert "qwen/revoked" in e.message and "re-authenticate" in e.message, e.message
    body = e.body if isinstance(e.body, dict) else {}
    assert body.get("reason") == "no_usable_credential" or body.get("type") == "tokenrelay_error", e.body
else:
    sys.exit("a revoked pool did not raise")
print("openai ok")
