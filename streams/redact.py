"""Personal data out of logs and error messages.

Customer values reach log lines and error messages through exceptions (a value that
failed a rule), database errors that quote the row, connector traces and library
messages. `install` redacts every log record as it is made, whichever library logs it;
`redact` is for the messages Accord prints or stores itself (dead-letter reasons,
command-line errors, `/health` problems). The payload of a dead letter keeps its original
bytes: that is what a replay needs.

What is replaced, in this order (each step sees the previous one's output):

1. Row dumps in database errors, whatever their columns: PostgreSQL's
   `Failing row contains (…)` and `Key (email)=(…)`, MariaDB's `Duplicate entry '…' for
   key`, `Incorrect … value: '…'` and `near '…' at line`, and any SQL `VALUES (…)` list.
   Column and key names stay; the values become `<redacted>`.
2. Values of fields that name a person, an address, a contact or a tax id, in
   `key=value`, `key: 'value'` and `"key": "value"` forms (`first_name`, `street`,
   `city`, `postal_code`, `phone`, `vat_id`, ...), whatever the value looks like.
3. Anything shaped like an email, valid or not (`ada@example`, `ada@@x.com`,
   `ada%40x.com`, `"Ada" <ada@x.com>` with its display name), but not an object
   reference (`Loader@6ba7383d`, `(1@0x7f5960267b90)`).
4. Tax ids (VAT-like `GB123456789`, US EIN `12-3456789`, SSN-shaped `123-45-6789`) and
   anything shaped like a phone number (`+44 20 7946 0018`, `(212) 555-0193 ext. 7`,
   `020 7946 0018`, `07700900123`), in one pass that first steps over the numbers
   Accord's own lines carry: UUIDs, dates and times, IPv4 addresses with ports.

Shapes, not validity: an invalid email or phone is still personal data. The limit is
a bare run of digits with no `+`, leading 0 or separator (`2125550193`): it cannot be
told from an offset or an epoch time, so it is left, unless a field name says it is
a phone (step 2). `phonenumbers.PhoneNumberMatcher` is not used: it matches offsets,
ports, epoch times and UUID fragments as "possible" numbers, and costs more than the
whole of `redact` on a typical line.
"""

from __future__ import annotations

import logging
import re

__all__ = ["install", "redact"]

REDACTED = "<redacted>"

# 1. Row dumps. Each pattern keeps its group 1 (the words around the values) and
# replaces the values. A dump cut short (a truncated message) is redacted to its end.
# The row ends at a `)` that ends the line, or the line of Accord's `… (detail.)`.
_PG_ROW = re.compile(r"(Failing row contains )\((?s:.*?)(?:\)(?=\.?\)?[ \t]*$)|\Z)", re.M)
_PG_KEY = re.compile(
    r"(\b[Kk]ey \([^\n]*?\)=)\((?s:.*?)"
    r"(?:\)(?=\s+(?:already exists|is not present|is still referenced|conflicts with)"
    r"|\.?\)?[ \t]*$)|\Z)",
    re.M,
)
_MARIADB_ENTRY = re.compile(r"(Duplicate entry )'(?:.*?'(?=\s+for key)|[^\n]*)")
_MARIADB_VALUE = re.compile(
    r"((?:Truncated i|I)ncorrect [\w ]{1,30}? value: )'(?:.*?'(?=\s+for\s|\s+at row|[ \t]*$)"
    r"|[^\n]*)",
    re.M,
)
_MARIADB_NEAR = re.compile(r"(\bnear )'(?:.*?'(?= at line \d)|[^\n]*)")
_ROW_DUMPS = (
    ("failing row", _PG_ROW, rf"\1({REDACTED})"),
    ("key (", _PG_KEY, rf"\1({REDACTED})"),
    ("duplicate entry", _MARIADB_ENTRY, rf"\1'{REDACTED}'"),
    ("incorrect", _MARIADB_VALUE, rf"\1'{REDACTED}'"),
    ("near '", _MARIADB_NEAR, rf"\1'{REDACTED}'"),
)
_SQL_VALUES = re.compile(r"\bVALUES\s*\(", re.I)
_PLACEHOLDER = r"\s*(?:\$\d+|%s|%\(\w+\)s|\?|:\w+)\s*"
_PLACEHOLDERS = re.compile(rf"\({_PLACEHOLDER}(?:,{_PLACEHOLDER})*\)(?:\s*,\s*\(.*?\))*", re.S)

# 2. Fields whose value is personal whatever it looks like, by kind (the placeholder).
_FIELD_KINDS = {
    "name": (
        r"first_name|last_name|display_name|legal_name|full_name|given_name|family_name"
        r"|company|company_name|contact_name"
    ),
    "address": (
        r"(?:billing_|shipping_|home_)?"
        r"(?:street(?:_address)?|address(?:_line_?\d)?|city|postal_code|post_?code|zip(?:_?code)?)"
    ),
    "email": r"e_?mail(?:_address)?",
    "phone": r"phone(?:_number)?|mobile|telephone|tel|fax",
    "tax-id": r"vat(?:_id|_number)?|tax_id|tax_number|tin|ein|ssn",
}
# The key before a `:` or `=` is read backwards from each separator (few per line),
# which is several times faster than trying a pattern of all keys at every position.
_KIND = re.compile(
    "|".join(f"(?P<{kind.replace('-', '_')}>{keys})" for kind, keys in _FIELD_KINDS.items())
    + "|(?P<bare_name>name)",  # too common to redact unquoted (`connector name=accord-crm`)
    re.I,
)
_SEPARATOR = re.compile(r"[:=]")
_VALUE = re.compile(
    r"(?P<quote>[\"'])(?:\\.|(?!(?P=quote)).)*(?P=quote)?"
    # Unquoted: up to a delimiter or the next `key=`; not a nested `{` or `[`.
    r"|(?![{\[\s])(?:(?!\s+[\w\"'`]+\s*[:=])[^,;&}\])\n])+"
)
_SERVER = re.compile(r"(?:[\w.-]*:\d{1,5}|\d{1,3}(?:\.\d{1,3}){3}|\[[\da-fA-F:]+\](?::\d+)?)(?!\S)")

# 3. Emails. The local part: what RFC 5322 allows bar `=`, `/`, `{`, `|`, `}`, `?`
# (which would swallow `key=` or paths), `'` only inside; unicode letters via \w.
_LOCAL = r"(?:\"[^\"\n]{1,64}\"|[\w!#$%&*+^~-](?:[\w.!#$%&'*+^~-]*[\w!#$%&*+^~-])?)"
_AT = r"(?:@+|%40|&#0*64;)"
_DOMAIN = r"(?:\[[^\]\s]{1,64}\]|[\w-]+(?:\.[\w-]+)*)"
_DOTTED = r"[\w-]+(?:\.[\w-]+)+"
_EMAIL = re.compile(
    rf"{_LOCAL}(?:{_AT}{_DOMAIN}(?:@+{_DOMAIN})*|[ \t]@+[ \t]?{_DOTTED}|@+[ \t]{_DOTTED})"
)
_AT_SIGN = re.compile(r"@|%40|&#")
_LOCAL_PUNCTUATION = frozenset("!#$%&'*+^~-._")
# `Class@6ba7383d`, `(1@0x7f5960267b90)`: Java's and Python's object references.
_OBJECT = re.compile(r"(?=[0-9a-fx]*\d)(?:0x)?[0-9a-f]{5,16}")
# The display name that goes with an address: `"Ada Lovelace" <…>`, `Ada Lovelace <…>`.
_DISPLAY = re.compile(
    r"(?:\"[^\"\n]*\"|'[^'\n]*'|(?:[A-ZÀ-Þ][\w'\u2019.-]*[ \t]+){1,3})[ \t]*<<email>>"
)

# 4. Numbers. Steps over what is not personal, then tax ids, then phones.
_KEEP = (
    r"\b[0-9a-fA-F]{8}-(?:[0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}\b"  # UUID
    r"|\b\d{4}-\d{2}-\d{2}(?:[T ]\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?(?:Z|[+-]\d{2}(?::?\d{2})?)?)?"
    r"|\b\d{1,2}[./]\d{1,2}[./]\d{4}\b"  # 03.12.2026, 12/03/2026
    r"|\b\d{1,3}(?:\.\d{1,3}){3}(?::\d{1,5})?\b"  # IPv4[:port]
)
_TAX = (
    r"(?<![\w.-])\d{3}-\d{2}-\d{4}(?![\w-]|\.\d)"  # SSN-shaped
    r"|(?<![\w.-])\d{2}-\d{7}(?![\w-]|\.\d)"  # US EIN
)
# VAT-like: two letters, then 8 to 12 letters and digits (at least 6 digits: `_vat`).
_VAT = re.compile(r"(?<![\w-])[A-Za-z]{2}[0-9A-Za-z]{8,12}(?![\w-])")
_ELEMENT = r"(?:\(\d{1,6}\)|\d{1,8})"
_SEP = r"(?:[ \t]?[./-][ \t]?|[ \t]|(?<=\))(?=\d)|(?<=\d)(?=\())"
_PHONE = (
    rf"(?<![\w.+/])(?<!\d[:,])(?<!\w-)(?:\+[ \t]?)?{_ELEMENT}(?:{_SEP}{_ELEMENT})+"
    r"(?:[ \t]*(?:[Ee][Xx][Tt]\.?|[Ee]xtension|[xX]|\#)[ \t]*\d{1,6})?"
    r"(?![\w]|[.:/,]\d|-\w)"
    # Written without separators: a +, a 0 trunk prefix, or 00 and a country code.
    r"|(?<![\w.+-])(?:\+[ \t]?\d{7,17}|0(?:0[1-9]\d{8,13}|[1-9]\d{8,9}))(?![\w]|[.:/,]\d|-\w)"
)
# Led by what a match starts with (a digit, + or parenthesis, not inside a word), which
# makes it several times faster. A UUID led by a letter needs no step over: a phone
# cannot start after `x-`.
_NUMBERS = re.compile(
    rf"(?=[\d+(])(?<!\w)(?:(?P<keep>{_KEEP})|(?P<tax>{_TAX})|(?P<phone>{_PHONE}))"
)
_DIGIT = re.compile(r"\d")
_EXTENSION = re.compile(r"[ \t]*(?:ext\.?|extension|x|#)[ \t]*\d+$", re.I)


def redact(text: str) -> str:
    """`text` with personal data replaced by placeholders (see the module docstring).

    Placeholders name what was there: `<email>`, `<phone>`, `<name>`, `<address>`,
    `<tax-id>`, and `<redacted>` for a row's values. Pure and safe on any string.
    """
    # Each step runs only when a cheap substring test says it could match: this runs
    # on every log record, and most carry none of it.
    lower = text.lower()
    for hint, pattern, replacement in _ROW_DUMPS:
        if hint in lower:
            text = pattern.sub(replacement, text)
    if "values" in lower:
        text = _redact_values(text)
    if "=" in text or ":" in text:
        text = _redact_fields(text)
    if "@" in text or "%40" in text or "&#" in text:
        text = _redact_emails(text)
        if "<<email>>" in text:
            text = _DISPLAY.sub("<email>", text)
    if not _DIGIT.search(text):
        return text
    return _NUMBERS.sub(_number, _VAT.sub(_vat, text))


def _redact_values(text: str) -> str:
    """Every `VALUES (…)[, (…)]` list becomes `VALUES (<redacted>)`, quotes respected;
    a statement's placeholders (`VALUES ($1, $2)`) stay."""
    pieces: list[str] = []
    position = 0
    while match := _SQL_VALUES.search(text, position):
        end = _tuple_end(text, match.end() - 1)
        while (after := re.match(r"\s*,\s*\(", text[end:])) is not None:
            end = _tuple_end(text, end + after.end() - 1)
        if _PLACEHOLDERS.fullmatch(text, match.end() - 1, end):
            pieces.append(text[position:end])
        else:
            pieces.append(f"{text[position : match.end()]}{REDACTED})")
        position = end
    pieces.append(text[position:])
    return "".join(pieces)


def _tuple_end(text: str, opening: int) -> int:
    """The index after the `)` that closes the `(` at `opening` (or the text's end)."""
    depth, quote, index = 0, "", opening
    while index < len(text):
        char = text[index]
        if quote:
            if char == "\\":
                index += 1
            elif char == quote:
                quote = ""
        elif char in "'\"`":
            quote = char
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                return index + 1
        index += 1
    return len(text)


def _redact_fields(text: str) -> str:
    """Values of personal fields: `key=value`, `key: 'value'`, `"key": value`."""
    pieces: list[str] = []
    position = 0
    for separator in _SEPARATOR.finditer(text):
        at = separator.start()
        if at < position or text[at - 1 : at] in (":", "=") or text[at + 1 : at + 2] in (":", "="):
            continue  # inside a value already replaced, or `::` / `==`
        if (key := _key_before(text, at)) is None:
            continue
        kind, quoted_key = key
        start = separator.end()
        while start < len(text) and text[start] in " \t":
            start += 1
        value = _VALUE.match(text, start)
        if value is None:
            continue
        quote = value["quote"] or ""
        if not quote and (kind == "bare_name" or (separator[0] == ":" and not quoted_key)):
            continue  # `email: max_length must be…`: Accord's words about a field
        if kind == "address" and _SERVER.match(value[0].lstrip("'\"")):
            continue  # `address=127.0.0.1:16066` is a server's, not a customer's
        placeholder = "name" if kind == "bare_name" else kind.replace("_", "-")
        pieces.append(f"{text[position:start]}{quote}<{placeholder}>{quote}")
        position = value.end()
    pieces.append(text[position:])
    return "".join(pieces)


def _key_before(text: str, end: int) -> tuple[str, bool] | None:
    """The kind of personal field whose key ends at `end` (spaces and a quote allowed
    between), and whether the key was quoted; None when the key is not one."""
    stop = end
    while stop and text[stop - 1] in " \t":
        stop -= 1
    quote = text[stop - 1] if stop and text[stop - 1] in "\"'`" else ""
    stop -= len(quote)
    last = text[stop - 1 : stop]
    if not (last.isalpha() or (last.isdigit() and text[stop - 2 : stop - 1] in ("e", "_"))):
        return None  # most separators: `08:04`, `]:`; keys end in a letter or `line1`
    begin = stop
    while begin and (text[begin - 1].isalnum() or text[begin - 1] == "_") and stop - begin < 40:
        begin -= 1
    match = _KIND.fullmatch(text, begin, stop)
    if match is None:
        return None
    if quote:
        if not begin or text[begin - 1] != quote:
            return None
        begin -= 1
    if begin and (text[begin - 1].isalnum() or text[begin - 1] in "_.-"):
        return None
    return str(match.lastgroup), bool(quote)


def _redact_emails(text: str) -> str:
    """Emails, each matched from where its local part starts, read back from its `@`
    (or `%40`, `&#64;`): much faster than trying a local part at every position."""
    pieces: list[str] = []
    position = 0
    for at in _AT_SIGN.finditer(text):
        if at.start() < position:
            continue
        start = _local_start(text, at.start(), position)
        match = _EMAIL.match(text, start) if start is not None else None
        if match is None or match.end() <= at.start():
            continue
        pieces.append(text[position:start] + _email(match))
        position = match.end()
    pieces.append(text[position:])
    return "".join(pieces)


def _local_start(text: str, at: int, floor: int) -> int | None:
    """Where the local part before the `@` at `at` starts (None: there is none)."""
    end = at - 1 if text[at - 1 : at] in (" ", "\t") else at  # `ada @example.com`
    if text[end - 1 : end] == '"':  # `"ada lovelace"@example.com`
        opening = text.rfind('"', floor, end - 1)
        return opening if opening >= 0 else None
    start = end
    while start > floor and (text[start - 1].isalnum() or text[start - 1] in _LOCAL_PUNCTUATION):
        start -= 1
    while start < end and text[start] in ".'":  # a local part starts with neither
        start += 1
    return start if start < end else None


def _email(match: re.Match[str]) -> str:
    address = match[0]
    return address if _OBJECT.fullmatch(address.rpartition("@")[2]) else "<email>"


def _number(match: re.Match[str]) -> str:
    if match["keep"] is not None:
        return match[0]
    if match["tax"] is not None:
        return "<tax-id>"
    return "<phone>" if _phone_shaped(match[0]) else match[0]


def _vat(match: re.Match[str]) -> str:
    return "<tax-id>" if sum(char.isdigit() for char in match[0]) >= 6 else match[0]


def _phone_shaped(candidate: str) -> bool:
    """Whether a run of digit groups is a phone number rather than numbers side by side.

    7 to 17 digits (E.164 allows 15; a little slack for trunk prefixes). With a `+` or
    a 0 trunk prefix that is enough, bar a signed decimal (`+0.1234567`). Otherwise the
    groups must look like a number split for reading: a slash or a group of 7 or 8
    digits only after a 0 area code (`089/12345678`, `0170 1234567`); a one-digit group
    only first,
    and then with four groups or more (`1 800 555 0199`); two groups joined by a dash,
    not a space (`555-0193`; `200 90734` is two numbers); dots not mixed with other
    separators and used for three groups or more (`1234.567` is a decimal).
    """
    number = _EXTENSION.sub("", candidate)
    digits = sum(char.isdigit() for char in number)
    if not 7 <= digits <= 17:
        return False
    groups = re.findall(r"\d+", number)
    separators = set(re.sub(r"[\d()+]", "", number))
    if number.startswith("+") or (number.startswith("0") and number.isdigit()):
        return not (separators == {"."} and len(groups) == 2)
    if ("/" in separators or max(map(len, groups)) > 6) and not re.match(r"\(?0\d", number):
        return False  # `089/12345678`, `0170 1234567`: only after a 0 area code
    if any(len(group) == 1 for group in groups[1:]):
        return False
    if len(groups[0]) == 1 and len(groups) < 4 and not number.startswith("("):
        return False
    if len(groups) == 2 and separators == {" "} and not number.startswith(("(", "0")):
        return False  # `200 90734`: two numbers (a phone in two groups has a 0 or a dash)
    return "." not in separators or (separators == {"."} and len(groups) >= 3)


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
