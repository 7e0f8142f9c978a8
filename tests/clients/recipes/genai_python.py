"""google-genai (Python): Gemini API with a key pool, file upload, and Vertex AI.

BASE is tokenrelay's proxy origin. The client holds no secret: a dummy key for the Gemini
API, a dummy token for Vertex AI (whose client refuses to start without credentials).
"""
import os
import tempfile

from google import genai
from google.genai import types
from google.oauth2.credentials import Credentials

base = os.environ["BASE"]

gemini = genai.Client(api_key="unused", http_options=types.HttpOptions(base_url=f"{base}/gemini"))
reply = gemini.models.generate_content(model="gemini-2.5-flash", contents="hi")
assert reply.text == "Hello from the fake Gemini.", reply
text = "".join(c.text or "" for c in gemini.models.generate_content_stream(model="gemini-2.5-flash", contents="hi"))
assert text == "Hello, streamed Gemini.", text

# files.upload: a resumable upload whose second leg goes to the x-goog-upload-url
# tokenrelay pointed back at itself.
with tempfile.NamedTemporaryFile(suffix=".txt", delete=False) as f:
    f.write(b"x" * 300_000)
uploaded = gemini.files.upload(file=f.name, config=types.UploadFileConfig(mime_type="text/plain"))
assert uploaded.name.startswith("files/"), uploaded
assert uploaded.size_bytes == 300_000, uploaded

vertex = genai.Client(
    vertexai=True,
    project="my-project",
    location="us-central1",
    credentials=Credentials(token="unused"),
    http_options=types.HttpOptions(base_url=f"{base}/vertex"),
)
reply = vertex.models.generate_content(model="gemini-2.5-flash", contents="hi")
assert reply.text == "Hello from the fake Gemini.", reply
print("genai python ok")
