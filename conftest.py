"""Repository-root conftest: puts the checkout on sys.path so tests see the source tree."""
