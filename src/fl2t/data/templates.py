"""Caption templates for images without captions, in the spirit of textual inversion / CIDM.

`{}` stands for the concept's subject phrase: "<tok> class" for objects, "<tok>" for styles.
"""

OBJECT_TEMPLATES = [
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a bright photo of the {}",
    "a close-up photo of a {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a photo of the small {}",
    "a photo of the large {}",
    "a close-up photo of the {}",
]

STYLE_TEMPLATES = [
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a picture in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a small painting in the style of {}",
    "a large painting in the style of {}",
    "an image in the style of {}",
]

# The template of the stable concept embedding C_g (DESIGN §3, Step 1).
STABLE_TEMPLATE = {"object": "a photo of {}", "style": "a painting in the style of {}"}


def caption_templates(kind: str) -> list[str]:
    return STYLE_TEMPLATES if kind == "style" else OBJECT_TEMPLATES
