"""Personal data out of logs and error messages: emails, phone numbers and names.

Customer values reach log lines and error messages through exceptions (a value that
failed a rule), connector traces and library messages. `install` redacts every log
record as it is made, whichever library logs it; `redact` is for the messages Accord
prints or stores itself (dead-letter reasons, command-line errors). The payload of a
dead letter keeps its original bytes: that is what a replay needs.
"""

from __future__ import annotations

import logging
import re

EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
# A phone number: an optional +, then at least 7 digits, allowing spaces, dots, dashes
# and brackets between them. Long bare digit runs (offsets, ids) are left alone unless
# they start with + or use a separator, which keeps Kafka offsets and ids readable.
PHONE = re.compile(r"(?<![\w.])(?:\+\d[\d ().-]{5,}\d|\(?\d{2,5}\)?[ .-]\d{2,5}[ .-]\d{3,5})(?!\w)")
# A value quoted after a field that holds a name: `first_name: 'Ada'`, "display_name='…'".
NAME = re.compile(
    r"(?P<field>\b(?:first_name|last_name|display_name|legal_name|company|name)\b"
    r"[\"']?\s*[:=]\s*)(?P<quote>['\"])(?P<value>.*?)(?P=quote)"
)


def redact(text: str) -> str:
    """`text` with emails, phone numbers and quoted names replaced by placeholders."""
    text = NAME.sub(lambda m: f"{m['field']}{m['quote']}<name>{m['quote']}", text)
    text = EMAIL.sub("<email>", text)
    return PHONE.sub("<phone>", text)


def install() -> None:
    """Redact every log record from now on, in this process."""
    if getattr(logging.getLogRecordFactory(), "_accord_redacts", False):
        return
    make_record = logging.getLogRecordFactory()

    def redacting(*args: object, **kwargs: object) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: leave it for logging to report
            return record
        record.msg, record.args = redact(message), ()
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return record

    redacting._accord_redacts = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(redacting)
