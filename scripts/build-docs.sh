#!/usr/bin/env bash
# Man pages and shell completions, generated from the argument parsers (gateway.cli.build_parser, one
# parser holding every subcommand and option with its help) by argparse-manpage and shtab:
#   OUT/man/man1/gateway.1              every subcommand
#   OUT/man/man1/gateway-serve.1        serve alone (the options QEMU's wrappers pass)
#   OUT/man/man1/gateway-proxy-helper.1 the same page under the drop-in's name (.so)
#   OUT/completions/bash/gateway        bash-completion (/usr/share/bash-completion/completions/)
#   OUT/completions/zsh/_gateway        zsh (/usr/share/zsh/vendor-completions/)
# usage: scripts/build-docs.sh OUT [PYTHON]   (PYTHON: a python with gateway, argparse-manpage and shtab;
# default .venv/bin/python, where setup.sh installs them)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out=${1:?usage: build-docs.sh OUT [PYTHON]}
python=${2:-$repo/.venv/bin/python}
bin=$(dirname "$python")
version=$("$python" -c 'import gateway; print(gateway.__version__)')
mkdir -p "$out/man/man1" "$out/completions/bash" "$out/completions/zsh"
man=(--project-name gateway --version "$version" --manual-title "gateway manual")
"$bin/argparse-manpage" --module gateway.cli --function build_parser --prog gateway "${man[@]}" \
    --description "policy-enforcing, audited, confined replacement for virtfs-proxy-helper" \
    --output "$out/man/man1/gateway.1"
"$bin/argparse-manpage" --module gateway.cli --function build_serve_parser --prog "gateway serve" "${man[@]}" \
    --description "serve a guest's 9p proxy requests under a policy (virtfs-proxy-helper's options)" \
    --output "$out/man/man1/gateway-serve.1"
# the page's own name, GATEWAY-SERVE(1), not the program's two words
sed -i '1s/^\.TH GATEWAY SERVE /.TH GATEWAY\\-SERVE /' "$out/man/man1/gateway-serve.1"
echo ".so man1/gateway-serve.1" > "$out/man/man1/gateway-proxy-helper.1"
"$bin/shtab" --shell=bash gateway.cli.build_parser > "$out/completions/bash/gateway"
"$bin/shtab" --shell=zsh gateway.cli.build_parser > "$out/completions/zsh/_gateway"
echo "build-docs: man pages and completions in $out"
