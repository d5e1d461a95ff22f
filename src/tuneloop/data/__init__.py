"""Data stage: read rows, validate them into conversations, render them with the model's chat template."""

from tuneloop.data.errors import DataError
from tuneloop.data.render import ChatFormat, ChatRenderer, chat_format_of, encode_dataset
from tuneloop.data.shapes import SHAPES, ShapeOptions, load_conversations
from tuneloop.data.types import Conversation, EncodedExample, EncodingReport, Message, RowRef

__all__ = [
    "SHAPES",
    "ChatFormat",
    "ChatRenderer",
    "Conversation",
    "DataError",
    "EncodedExample",
    "EncodingReport",
    "Message",
    "RowRef",
    "ShapeOptions",
    "chat_format_of",
    "encode_dataset",
    "load_conversations",
]
