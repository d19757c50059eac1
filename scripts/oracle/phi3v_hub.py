"""Imports Microsoft's Phi-3-V remote code under transformers 4.45.2, for the Phi-3-V oracle
scripts (the code is not part of this repository).

The 4.45.2 install comes from scripts/setup.sh ($LMMS_FT_PHI3V_PYTHONPATH, default
$LMMS_FT_HOME/oracle-tf445) and goes in front of the venv's packages. The Hub files come from
$LMMS_FT_PHI3V_HUB_CODE, else ../shared/hf-configs/microsoft--Phi-3-vision-128k-instruct beside
the checkout; they import each other relatively, so they are copied into a temporary package.
"""

import glob
import os
import shutil
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def code_dir(explicit=None):
    return explicit or os.environ.get("LMMS_FT_PHI3V_HUB_CODE") or os.path.join(
        os.path.dirname(REPO), "shared", "hf-configs", "microsoft--Phi-3-vision-128k-instruct")


def load(explicit=None):
    """Returns (package root to delete afterwards, modules dict)."""
    oracle = os.environ.get("LMMS_FT_PHI3V_PYTHONPATH") or os.path.join(
        os.environ.get("LMMS_FT_HOME", os.path.expanduser("~/.cache/lmms-ft")), "oracle-tf445")
    if not os.path.isdir(os.path.join(oracle, "transformers")):
        sys.exit(f"no transformers 4.45.2 oracle at {oracle}: run scripts/setup.sh")
    sys.path.insert(0, oracle)
    src = code_dir(explicit)
    if not os.path.isfile(os.path.join(src, "modeling_phi3_v.py")):
        sys.exit(f"no Phi-3-V Hub code in {src} (set LMMS_FT_PHI3V_HUB_CODE)")
    import transformers

    assert transformers.__version__ == "4.45.2", transformers.__version__
    root = tempfile.mkdtemp(prefix="phi3v-hub-")
    pkg = os.path.join(root, "phi3v_remote")
    os.makedirs(pkg)
    for f in glob.glob(os.path.join(src, "*.py")):
        shutil.copy(f, pkg)
    open(os.path.join(pkg, "__init__.py"), "w").close()
    sys.path.insert(0, root)
    import phi3v_remote.configuration_phi3_v as configuration
    import phi3v_remote.image_embedding_phi3_v as embedding
    import phi3v_remote.image_processing_phi3_v as image_processing
    import phi3v_remote.modeling_phi3_v as modeling
    import phi3v_remote.processing_phi3_v as processing

    return root, {"configuration": configuration, "embedding": embedding, "modeling": modeling,
                  "image_processing": image_processing, "processing": processing}


def set_tower(embedding, clip):
    """Replaces the Hub's hard-coded ViT-L/14-336 by the CLIPVisionConfig `clip` (a dict)."""
    from transformers import CLIPVisionConfig

    embedding.CLIP_VIT_LARGE_PATCH14_336_CONFIG = CLIPVisionConfig(**clip)
