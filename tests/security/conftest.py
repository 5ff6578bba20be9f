"""The security tests' fixtures: the gateway tests' tiny model and the upload corpus."""

from tests.gateway.conftest import gateway_model_dir  # noqa: F401
from tests.lifecycle.test_uploads import corpus  # noqa: F401
