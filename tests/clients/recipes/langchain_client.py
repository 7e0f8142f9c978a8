"""LangChain: ChatOpenAI against `${BASE}/dashscope/v1`, ChatGoogleGenerativeAI with
base_url `${BASE}/gemini`. Dummy keys."""
import os

from langchain_google_genai import ChatGoogleGenerativeAI
from langchain_openai import ChatOpenAI

base = os.environ["BASE"]
openai_like = ChatOpenAI(model="qwen-plus", base_url=f"{base}/dashscope/v1", api_key="unused", max_retries=0)
assert openai_like.invoke("hi").content == "Hello from the fake upstream."
gemini = ChatGoogleGenerativeAI(model="gemini-2.5-flash", google_api_key="unused", base_url=f"{base}/gemini", max_retries=0)
assert gemini.invoke("hi").content == "Hello from the fake Gemini.", gemini.invoke("hi")
print("langchain ok")
