"""MkDocs hook: build the site from the repository's own layout.

`README.md` becomes the home page, the guides keep their `docs/` paths and the plot the README
shows is copied, so a relative link resolves in the site exactly as it does in the repository.
"""

import os

from mkdocs.structure.files import File, Files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Files outside docs/ that the pages show or link to.
EXTRA = ["README.md", "benchmarks/results/mnist.png"]


def on_files(files, config):
    def page(path):
        return File(path, ROOT, config["site_dir"], config["use_directory_urls"])

    guides = [page(f"docs/{f.src_uri}") for f in files.documentation_pages()]
    theme = [f for f in files if f.src_dir != config["docs_dir"]]  # the theme's css and js
    return Files(theme + guides + [page(path) for path in EXTRA])
