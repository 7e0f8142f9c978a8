"""The official google-genai SDK through tokenrelay (driven by tests/clients.rs)."""
import os

from google import genai
from google.genai import types

client = genai.Client(
    api_key="dummy-key-the-sdk-needs",
    http_options=types.HttpOptions(base_url=os.environ["BASE_URL"]),
)
reply = client.models.generate_content(model="gemini-2.5-flash", contents="hi")
assert reply.text == "Hello from the fake Gemini.", reply

text = "".join(chunk.text or "" for chunk in client.models.generate_content_stream(model="gemini-2.5-flash", contents="hi"))
assert text == "Hello, streamed Gemini.", text
print("genai ok")
