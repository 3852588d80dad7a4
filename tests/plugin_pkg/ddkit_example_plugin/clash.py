"""Claims a builtin's name on purpose, to test clash detection. Blocked unless a test unblocks it."""
from ddkit import hookimpl
from ddkit.types import TransformSpec


class Mirror:
    name = "identity"


@hookimpl
def ddkit_transforms():
    yield TransformSpec(name="identity", factory=Mirror, summary="clashes with the builtin identity")
