"""Image grids for figures: images in rows, with optional labels beside the rows and above the
columns."""
import math

from PIL import Image, ImageDraw


def image_grid(images_uint8, nrow, row_labels=(), pad=2, scale=1, col_labels=()):
    """(B, C, H, W) uint8 -> PIL image, nrow images per row, optional text labels left of the rows
    (in a column as wide as the longest) and above the columns; scale > 1 enlarges every image
    (nearest) so small images stay readable."""
    label_width = row_label_width(row_labels) if row_labels else 0
    if scale > 1:
        images_uint8 = images_uint8.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    B, C, H, W = images_uint8.shape
    top = 12 if col_labels else 0  # a line of text
    size = (label_width + nrow * (W + pad), top + math.ceil(B / nrow) * (H + pad))
    canvas = Image.new("L" if C == 1 else "RGB", size, 255)
    for i, im in enumerate(images_uint8):
        arr = im.permute(1, 2, 0).cpu().numpy()
        canvas.paste(Image.fromarray(arr[..., 0] if C == 1 else arr),
                     (label_width + (i % nrow) * (W + pad), top + (i // nrow) * (H + pad)))
    draw = ImageDraw.Draw(canvas)
    for r, text in enumerate(row_labels):  # centred on the row, a text line being ~11 px high
        y = top + r * (H + pad) + H // 2 - 6 * (text.count("\n") + 1)
        draw.text((2, y), text, fill=0)
    for c, text in enumerate(col_labels):
        draw.text((label_width + c * (W + pad) + 2, 0), text, fill=0)
    return canvas


def row_label_width(labels):
    """Pixels for row labels in PIL's default font (about 6 px a character) and a margin."""
    return 6 * max((len(line) for text in labels for line in text.split("\n")), default=0) + 8
