"""The Diffusion-CAM probe (METHOD.md §2): from a batch of images and prompts to token maps.

    targets.py       what is explained, in which denoising state (ProbeConfig, Target)
    contrast.py      the explained score (target logit vs its competitors)
    grid.py          TokenMap, the image grid of a hooked stream, the MapVariant interface
    attribution.py   the gradient pass every gradient variant shares (hook + autograd)
    variants.py      the map variants (grad_norm, grad_x_act, paper_cam, grad_cam, llava_cam, tam)
    tam.py           TAM, gradient-free
    faithfulness.py  deletion / insertion curves measured with the model
    explain.py       explain_batch: all of the above for a batch, every method sharing one generation
"""
