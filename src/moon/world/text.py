"""Marketplace text: stuffed listing titles, shoppers' search texts, shop names and prices.

Titles name only some attributes, mix synonyms, abbreviations and Chinese words, and stuff
keywords; search texts take a few attributes and the item's name (or a synonym or its category),
sometimes with a typo. Every function takes a ``numpy.random.Generator``; nothing uses ``hash()``.
"""

from __future__ import annotations

import numpy as np

from moon.world.attributes import Variant

COLOR_WORDS: dict[str, tuple[str, ...]] = {
    "red": ("red", "crimson", "scarlet", "红色"),
    "blue": ("blue", "royal blue", "azure", "蓝色"),
    "green": ("green", "emerald", "grn", "绿色"),
    "yellow": ("yellow", "lemon yellow", "ylw", "黄色"),
    "black": ("black", "blk", "jet black", "黑色"),
    "white": ("white", "wht", "snow white", "白色"),
    "pink": ("pink", "rose", "blush", "粉色"),
    "purple": ("purple", "violet", "lilac", "紫色"),
    "orange": ("orange", "tangerine", "org", "橙色"),
    "brown": ("brown", "coffee", "chocolate brown", "棕色"),
    "grey": ("grey", "gray", "gry", "灰色"),
    "navy": ("navy", "navy blue", "dark blue", "藏青"),
    "beige": ("beige", "cream", "khaki", "米色"),
    "teal": ("teal", "turquoise", "cyan", "青色"),
}
PATTERN_WORDS: dict[str, tuple[str, ...]] = {
    "solid": ("solid", "plain", "pure color", "纯色"),
    "striped": ("striped", "stripes", "stripe", "条纹"),
    "polka dot": ("polka dot", "dotted", "dots", "波点"),
    "plaid": ("plaid", "checked", "tartan", "格子"),
    "zigzag": ("zigzag", "chevron", "wave pattern", "波浪"),
}
MATERIAL_WORDS: dict[str, tuple[str, ...]] = {
    "plastic": ("plastic", "ABS", "PP", "塑料"),
    "metal": ("metal", "stainless steel", "alloy", "金属"),
    "wood": ("wood", "wooden", "solid wood", "木质"),
    "leather": ("leather", "PU leather", "genuine leather", "皮革"),
    "cotton": ("cotton", "100% cotton", "fabric", "纯棉"),
    "glass": ("glass", "crystal", "clear glass", "玻璃"),
}
STYLE_WORDS: dict[str, tuple[str, ...]] = {
    "classic": ("classic", "timeless", "经典"),
    "vintage": ("vintage", "retro", "复古"),
    "sport": ("sport", "sporty", "athletic", "运动"),
    "minimalist": ("minimalist", "simple", "minimal", "简约"),
    "cute": ("cute", "kawaii", "lovely", "可爱"),
    "luxury": ("luxury", "premium", "deluxe", "轻奢"),
}
SIZE_WORDS: dict[str, tuple[str, ...]] = {
    "S": ("S", "small", "size S", "小号"),
    "M": ("M", "medium", "size M", "中号"),
    "L": ("L", "large", "size L", "大号"),
    "XL": ("XL", "extra large", "size XL", "加大"),
}
PACK_WORDS: dict[str, tuple[str, ...]] = {
    "1 pc": ("1pc", "single", "1 piece"),
    "2 pcs": ("2pcs", "2-pack", "set of 2", "两件装"),
    "3 pcs": ("3pcs", "3-pack", "set of 3", "三件装"),
}
NOUN_SYNONYMS: dict[str, tuple[str, ...]] = {
    "mug": ("cup", "coffee mug", "马克杯"),
    "teacup": ("tea cup", "cup"),
    "sneaker": ("trainer", "running shoe", "运动鞋"),
    "t-shirt": ("tee", "t shirt", "T恤"),
    "shirt": ("blouse", "button-up", "衬衫"),
    "pullover": ("sweater", "jumper", "毛衣"),
    "trousers": ("pants", "slacks", "裤子"),
    "dress": ("gown", "frock", "连衣裙"),
    "coat": ("jacket", "overcoat", "外套"),
    "sandal": ("sandals", "flip flop", "凉鞋"),
    "ankle boot": ("boots", "bootie", "短靴"),
    "handbag": ("purse", "shoulder bag", "手提包"),
    "telephone": ("phone", "landline"),
    "mobile phone": ("cell phone", "smartphone", "手机"),
    "laptop": ("notebook", "笔记本"),
    "computer": ("pc", "desktop"),
    "television": ("tv", "电视"),
    "car": ("toy car", "auto", "model car"),
    "bicycle": ("bike", "cycle", "自行车"),
    "teddy bear": ("plush bear", "stuffed bear"),
    "soccer ball": ("football",),
    "scissors": ("shears",),
    "pen": ("ballpoint", "biro"),
    "burger": ("hamburger",),
    "fries": ("chips", "french fries"),
    "apple": ("apples", "苹果"),
    "suitcase": ("luggage", "trolley case", "行李箱"),
    "umbrella": ("parasol", "雨伞"),
    "cap": ("baseball cap", "hat"),
    "couch": ("sofa",),
    "lamp": ("light", "desk lamp", "台灯"),
}
PREFIXES = (
    "2024 New",
    "HOT",
    "【包邮】",
    "Free Shipping",
    "Wholesale",
    "新款",
    "爆款",
    "Official",
    "NEW ARRIVAL",
    "Original",
    "正品",
)
STUFFING = (
    "gift",
    "for women men",
    "kids",
    "home office",
    "high quality",
    "cheap",
    "best seller",
    "fashion",
    "durable",
    "portable",
    "birthday present",
    "家用",
    "ins风",
    "送礼",
    "特价",
    "hot sale",
    "trendy",
    "multi-use",
    "w/ box",
)
SHOP_WORDS = ("Store", "Shop", "Official", "Mall", "Outlet", "Trading", "Flagship", "Market", "Direct", "Boutique")
SHOP_NAMES = (
    "Happy",
    "Sunny",
    "Golden",
    "Lucky",
    "Star",
    "Ocean",
    "Panda",
    "Maple",
    "Dragon",
    "Blue Sky",
    "Moon",
    "Lotus",
)


def _one(rng: np.random.Generator, words) -> str:
    return words[int(rng.integers(len(words)))]


def noun_word(noun: str, rng: np.random.Generator, p_synonym: float = 0.35) -> str:
    syn = NOUN_SYNONYMS.get(noun.lower())
    if syn and rng.random() < p_synonym:
        return _one(rng, syn)
    return noun.lower()


def shop_name(rng: np.random.Generator) -> str:
    return f"{_one(rng, SHOP_NAMES)} {_one(rng, SHOP_WORDS)}"


def price(rng: np.random.Generator) -> str:
    value = float(np.exp(rng.uniform(np.log(3), np.log(400))))
    if rng.random() < 0.3:
        return f"RMB {int(value * 7)}"
    return f"${value:.2f}" if value < 100 else f"${int(value)}"


def title(noun: str, category: tuple[str, ...] | list[str], variant: Variant, rng: np.random.Generator) -> str:
    """A stuffed marketplace title naming the item and only some of its attributes."""
    parts: list[str] = []
    if rng.random() < 0.6:
        parts.append(_one(rng, PREFIXES))
    if rng.random() < 0.75:
        parts.append(variant.brand if rng.random() < 0.8 else variant.brand.upper())
    named = []
    for words, value, p in (
        (STYLE_WORDS, variant.style, 0.35),
        (COLOR_WORDS, variant.color, 0.6),
        (PATTERN_WORDS, variant.pattern, 0.3 if variant.pattern == "solid" else 0.5),
        (MATERIAL_WORDS, variant.material, 0.45),
    ):
        if rng.random() < p:
            named.append(_one(rng, words[value]))
    parts.extend(named)
    parts.append(noun_word(noun, rng, 0.3))
    if rng.random() < 0.5:
        parts.append(category[-2] if rng.random() < 0.6 else category[1])
    if rng.random() < 0.4:
        parts.append(_one(rng, SIZE_WORDS[variant.size]))
    if variant.pack != "1 pc" and rng.random() < 0.6:
        parts.append(_one(rng, PACK_WORDS[variant.pack]))
    stuff = rng.permutation(len(STUFFING))[: int(rng.integers(1, 5))]
    parts.extend(STUFFING[int(i)] for i in stuff)
    if rng.random() < 0.3:
        parts.append(noun_word(noun, rng, 1.0))  # the item named twice, as sellers do
    return " ".join(parts)


def _typo(word: str, rng: np.random.Generator) -> str:
    if len(word) < 4 or not word.isascii():
        return word
    i = int(rng.integers(1, len(word) - 1))
    op = int(rng.integers(3))
    if op == 0:  # swap two letters
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    if op == 1:  # drop one
        return word[:i] + word[i + 1 :]
    return word[:i] + word[i] + word[i:]  # double one


def search_text(noun: str, category: tuple[str, ...] | list[str], variant: Variant, rng: np.random.Generator) -> str:
    """A shopper's search: 1–3 attribute words + the item (name, synonym or category word), maybe a typo."""
    words: list[str] = []
    for words_of, value, p in (
        (COLOR_WORDS, variant.color, 0.6),
        (dict.fromkeys([variant.brand], (variant.brand.lower(),)), variant.brand, 0.3),
        (MATERIAL_WORDS, variant.material, 0.2),
        (PATTERN_WORDS, variant.pattern, 0.15 if variant.pattern == "solid" else 0.35),
        (STYLE_WORDS, variant.style, 0.15),
        (SIZE_WORDS, variant.size, 0.1),
    ):
        if rng.random() < p:
            words.append(_one(rng, words_of[value]).lower())
    r = rng.random()
    if r < 0.15:
        words.append(category[-2].lower())  # only the category word ("fruit", "desk supplies")
    else:
        words.append(noun_word(noun, rng, 0.4))
        if r > 0.85:
            words.append(category[1].lower())
    words = [_typo(w, rng) if rng.random() < 0.12 else w for w in words]
    return " ".join(words)


def short_hint(variant: Variant, rng: np.random.Generator) -> str:
    """The text of a multimodal query: a short hint next to the photo ("in navy", "zenko striped")."""
    options = [
        f"in {_one(rng, COLOR_WORDS[variant.color]).lower()}",
        f"{variant.brand.lower()} {_one(rng, COLOR_WORDS[variant.color]).lower()}",
        f"same {_one(rng, PATTERN_WORDS[variant.pattern]).lower()} {_one(rng, COLOR_WORDS[variant.color]).lower()}",
        f"{variant.brand.lower()} one",
        f"{_one(rng, COLOR_WORDS[variant.color]).lower()} {_one(rng, SIZE_WORDS[variant.size]).lower()}",
    ]
    return _one(rng, options)
