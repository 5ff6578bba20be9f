"""One exception type for every problem a user can fix; the CLI prints it on one line."""


class SaLoRAError(Exception):
    """Bad input or an unusable artefact: the message says what and where."""
