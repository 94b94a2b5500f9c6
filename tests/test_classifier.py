from tests.conftest import needs_fashion_mnist

pytestmark = needs_fashion_mnist
