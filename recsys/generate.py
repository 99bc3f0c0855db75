"""A seeded synthetic catalogue and click log with a known click model (the embedded default data).

The right ranking depends on both the *meaning* of item text and *behaviour*:

- every item belongs to one hidden topic; the topic appears only in the words of its title and
  description (its `category` and `subcategory` are generic sections drawn independently of it):
  for some items in common words of the topic ("telescope", "galaxy"), for the others
  (`name_share`) only in the catalogue's own names for it (series, teams, brands: "Wailum",
  "Houmen"), which no pretrained encoder has seen: only fine-tuning on clicks can tell that
  "Wailum" items are space items, as a real catalogue's names and jargon are learnt;
- every user prefers one or two topics, visible only through the items in their history;
- every item has a hidden quality (a popularity driver) and ages after publication;
- users examine a slate top-down (position bias) and click with probability

      P(click) = examine(pos) * sigmoid(b0 + b_topic*affinity + b_q*quality - b_age*age_days)

So a ranker that sees the text (topic affinity) and behaviour (CTR, freshness) beats one that sees
either alone, and `GroundTruth` lets tests check that.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import numpy as np
import polars as pl

from recsys.data.dataset import Dataset
from recsys.data.schema import IMPRESSIONS, INTERACTIONS, ITEMS, conform
from recsys.errors import ConfigError

TOPICS: dict[str, tuple[str, ...]] = {
    "space": ("telescope", "galaxy", "astronaut", "orbit", "rocket", "planet", "nebula",
              "satellite", "comet", "lunar lander", "spacecraft", "asteroid"),
    "cooking": ("recipe", "pasta", "oven", "tomato sauce", "baking", "kitchen", "spices",
                "dessert", "sourdough bread", "chef", "garlic", "soup"),
    "football": ("striker", "goalkeeper", "league", "penalty", "midfield", "stadium",
                 "transfer window", "coach", "tournament", "referee", "derby", "kickoff"),
    "finance": ("stocks", "inflation", "interest rates", "bonds", "investors", "dividend",
                "central bank", "portfolio", "recession", "currency", "earnings", "mortgage"),
    "health": ("vaccine", "cardiology", "nutrition", "hospital", "therapy", "diabetes",
               "sleep", "fitness", "immune system", "nurses", "surgery", "blood pressure"),
    "music": ("guitar", "album", "concert", "orchestra", "jazz", "songwriter", "melody",
              "vinyl", "drummer", "music festival", "symphony", "chorus"),
    "gardening": ("tomato plants", "compost", "roses", "seedlings", "pruning", "soil",
                  "greenhouse", "tulips", "orchard", "weeds", "hedges", "allotment"),
    "technology": ("smartphone", "software", "microchips", "cloud computing", "robots",
                   "laptop", "encryption", "startup", "algorithm", "battery", "network", "app"),
    "travel": ("airline", "passport", "beaches", "hotel", "backpacking", "islands", "cruise",
               "tourists", "luggage", "resort", "road trip", "museum"),
    "cinema": ("film director", "actress", "screenplay", "premiere", "box office", "sequel",
               "documentary", "animation", "trailer", "film festival", "cinematography", "oscars"),
    "pets": ("puppy", "kitten", "veterinarian", "dog training", "aquarium", "parrot", "leash",
             "animal shelter", "grooming", "hamster", "cat food", "horses"),
    "climate": ("drought", "wildfire", "emissions", "glaciers", "heatwave", "solar panels",
                "floods", "carbon", "wind farms", "sea level", "hurricane", "renewable energy"),
}  # fmt: skip

# The catalogue's own names of each topic (invented words: series, teams, brands).
NAMES: dict[str, tuple[str, ...]] = {
    "space": ("Wailum", "Houmen", "Kilmum", "Warum", "Vouxar", "Stisken"),
    "cooking": ("Pistar", "Gluzzey", "Fymon", "Puskia", "Glemo", "Truxa"),
    "football": ("Saxey", "Xomia", "Stairey", "Quoven", "Xaicken", "Loulo"),
    "finance": ("Fistum", "Tustum", "Painon", "Glalmey", "Puzzum", "Niley"),
    "health": ("Valis", "Hilmo", "Mouvis", "Hyvey", "Surix", "Faisto"),
    "music": ("Hoven", "Systen", "Brainis", "Glouxix", "Femum", "Glyzzia"),
    "gardening": ("Xulmo", "Hethia", "Mystix", "Hunis", "Xorthen", "Pastum"),
    "technology": ("Hothey", "Gliron", "Kathis", "Stacko", "Syxix", "Poxey"),
    "travel": ("Soulis", "Kulmix", "Trickey", "Foumia", "Xevia", "Drazzon"),
    "cinema": ("Poulo", "Stomum", "Xackix", "Gloustey", "Kailmen", "Teckis"),
    "pets": ("Vevis", "Dryckey", "Xixen", "Kylmar", "Zyrthey", "Xuckum"),
    "climate": ("Raizzey", "Stostum", "Mothia", "Kalmar", "Tundia", "Pimum"),
}  # fmt: skip

CATEGORIES = ("features", "analysis", "guides", "reviews", "briefs", "opinion")
SUBCATEGORIES = ("long read", "explainer", "interview", "list", "column", "report")
TITLE_TEMPLATES = (
    "{a} and {b}: what comes next",
    "Why {a} matters more than ever",
    "Inside the world of {a}",
    "{A}, {b} and the week ahead",
    "Ten things nobody tells you about {a}",
    "The surprising story of {a} and {b}",
    "How {a} is changing",
    "A beginner's guide to {a}",
)
DESC_TEMPLATES = (
    "A closer look at {a}, {b} and {c}. {filler}",
    "{filler} This time the focus is {a}, with notes on {b} and {c}.",
    "What we learned about {a} this month, and how {b} and {c} fit in. {filler}",
    "{A} meets {b} in this piece, with a detour through {c}. {filler}",
)
FILLER = (
    "Our writers spoke to people who know the subject well.",
    "Read on for the details and what they mean for you.",
    "It is a short read with plenty of practical advice.",
    "The answers may not be what you expect.",
    "We compare the options and weigh the evidence.",
    "Experts disagree, and here is why.",
)


@dataclass(frozen=True)
class GeneratorConfig:
    """Sizes and click-model weights of the synthetic data (defaults: the embedded demo data)."""

    n_items: int = 3000
    n_users: int = 2000
    n_shown: int = 50_000  # impression rows (item shown in a slate)
    slate_size: int = 10
    days: int = 14
    start: datetime = datetime(2026, 1, 5, tzinfo=UTC)
    history_min: int = 3
    history_max: int = 15
    fresh_days: float = 10.0  # candidates are items published within this many days
    b0: float = -1.5
    b_topic: float = 3.0  # weight of topic affinity (text-only signal)
    b_quality: float = 0.9  # weight of item quality (behaviour: popularity / CTR)
    b_age: float = 0.25  # per day since publication (behaviour: freshness)
    position_decay: float = 0.15  # examine(pos) = 1 / (1 + decay * pos)
    name_share: float = 0.5  # items whose text names their topic by the catalogue's names only
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_items", "n_users", "n_shown", "slate_size", "days"):
            if getattr(self, name) < 1:
                raise ConfigError(f"generator: {name} must be >= 1, got {getattr(self, name)}")
        if self.n_shown < self.slate_size:
            raise ConfigError("generator: n_shown must be >= slate_size")
        if not 1 <= self.history_min <= self.history_max:
            raise ConfigError("generator: need 1 <= history_min <= history_max")
        if not 0.0 <= self.name_share <= 1.0:
            raise ConfigError(f"generator: name_share must be in [0, 1], got {self.name_share}")


@dataclass(frozen=True)
class GroundTruth:
    """The hidden variables of the click model (for tests and diagnostics)."""

    item_topic: pl.DataFrame  # item_id, topic, quality
    user_topics: pl.DataFrame  # user_id, topic, affinity (one row per preferred topic)
    config: GeneratorConfig

    def click_probability(self, impressions: pl.DataFrame, items: pl.DataFrame) -> np.ndarray:
        """P(click | examined) of each (user_id, item_id, ts) row of `impressions`."""
        c = self.config
        df = (
            impressions.select("user_id", "item_id", "ts")
            .with_row_index("__i")
            .join(self.item_topic, on="item_id", how="left")
            .join(self.user_topics, on=["user_id", "topic"], how="left")
            .join(items.select("item_id", "published_at"), on="item_id", how="left")
            .sort("__i")
        )
        aff = df["affinity"].fill_null(0.0).to_numpy()
        age = ((df["ts"] - df["published_at"]).dt.total_seconds() / 86400.0).to_numpy()
        logit = c.b0 + c.b_topic * aff + c.b_quality * df["quality"].to_numpy() - c.b_age * age
        return np.asarray(1.0 / (1.0 + np.exp(-logit)))


def _fmt(rng: np.random.Generator, template: str, words: tuple[str, ...]) -> str:
    a, b, c = rng.choice(len(words), size=3, replace=False)
    text = template.format(
        a=words[a], b=words[b], c=words[c], A=words[a].capitalize(), filler=rng.choice(FILLER)
    )
    return text[0].upper() + text[1:]


def generate(config: GeneratorConfig | None = None) -> tuple[Dataset, GroundTruth]:
    """Generate the catalogue, histories and click log. Same config and seed, same data."""
    c = config or GeneratorConfig()
    rng = np.random.default_rng(c.seed)
    topics = list(TOPICS)
    n_topics = len(topics)
    span = c.days * 86400.0

    # Items: topic only in the words; published from `fresh_days` before the log to its end.
    item_ids = [f"i{n:05d}" for n in range(c.n_items)]
    item_topic = rng.integers(0, n_topics, c.n_items)
    quality = rng.normal(0.0, 1.0, c.n_items)
    pub_offset = rng.uniform(-c.fresh_days * 86400.0, span, c.n_items)  # seconds from start
    # Named items draw from their own stream, so every other draw is as without names.
    name_rng = np.random.default_rng([c.seed, 1])
    named = name_rng.random(c.n_items) < c.name_share
    titles, descs = [], []
    for t, by_name in zip(item_topic, named, strict=True):
        words = TOPICS[topics[t]]
        title = str(rng.choice(TITLE_TEMPLATES))
        titles.append(_fmt(rng, title, words))
        desc = str(rng.choice(DESC_TEMPLATES))
        descs.append(_fmt(rng, desc, words))
        if by_name:
            titles[-1] = _fmt(name_rng, title, NAMES[topics[t]])
            descs[-1] = _fmt(name_rng, desc, NAMES[topics[t]])
    start = c.start
    items = pl.DataFrame(
        {
            "item_id": item_ids,
            "title": titles,
            "description": descs,
            "category": rng.choice(CATEGORIES, c.n_items),
            "subcategory": rng.choice(SUBCATEGORIES, c.n_items),
            "published_at": [start + timedelta(seconds=float(s)) for s in pub_offset],
        }
    )

    # Users: one or two preferred topics (affinity 1.0, 0.6) and an activity level.
    user_ids = [f"u{n:05d}" for n in range(c.n_users)]
    first = rng.integers(0, n_topics, c.n_users)
    second = (first + rng.integers(1, n_topics, c.n_users)) % n_topics
    has_second = rng.random(c.n_users) < 0.5
    activity = rng.lognormal(0.0, 0.7, c.n_users)

    # Pre-log histories (no timestamp): mostly from preferred topics.
    by_topic = [np.flatnonzero(item_topic == t) for t in range(n_topics)]
    early = np.flatnonzero(pub_offset < 0)
    early_by_topic = [np.intersect1d(b, early) for b in by_topic]
    hist_user, hist_item = [], []
    for u in range(c.n_users):
        n = int(rng.integers(c.history_min, c.history_max + 1))
        for _ in range(n):
            r = rng.random()
            if r < 0.65:
                pool = early_by_topic[first[u]]
            elif r < 0.85 and has_second[u]:
                pool = early_by_topic[second[u]]
            else:
                pool = early
            if len(pool) == 0:  # tiny catalogues: fall back to any early (or any) item
                pool = early if len(early) else np.arange(c.n_items)
            hist_user.append(u)
            hist_item.append(int(rng.choice(pool)))
    history = pl.DataFrame(
        {"user_id": [user_ids[u] for u in hist_user], "item_id": [item_ids[i] for i in hist_item]}
    ).unique(maintain_order=True)

    # Slates: a user (by activity), a time, candidates among fresh items published before it.
    n_imp = c.n_shown // c.slate_size
    imp_user = rng.choice(c.n_users, n_imp, p=activity / activity.sum())
    imp_t = np.sort(rng.uniform(0.0, span, n_imp))
    order = np.argsort(pub_offset)
    pub_sorted = pub_offset[order]
    aff_table = np.zeros((c.n_users, n_topics))
    aff_table[np.arange(c.n_users), first] = 1.0
    aff_table[np.arange(c.n_users)[has_second], second[has_second]] = 0.6
    rows_imp, rows_item, rows_pos, rows_click = [], [], [], []
    for k in range(n_imp):
        t = imp_t[k]
        lo = np.searchsorted(pub_sorted, t - c.fresh_days * 86400.0)
        hi = np.searchsorted(pub_sorted, t)
        pool = order[lo:hi]
        size = min(c.slate_size, len(pool))
        if size == 0:
            continue
        cand = rng.choice(pool, size, replace=False)
        u = imp_user[k]
        age_days = (t - pub_offset[cand]) / 86400.0
        logit = c.b0 + c.b_topic * aff_table[u, item_topic[cand]] + c.b_quality * quality[cand]
        p = 1.0 / (1.0 + np.exp(-(logit - c.b_age * age_days)))
        pos = np.arange(size)
        examine = 1.0 / (1.0 + c.position_decay * pos)
        click = rng.random(size) < p * examine
        rows_imp += [k] * size
        rows_item += cand.tolist()
        rows_pos += pos.tolist()
        rows_click += click.tolist()
    imp_idx = np.asarray(rows_imp)
    impressions = pl.DataFrame(
        {
            "impression_id": [f"m{k:06d}" for k in imp_idx],
            "user_id": [user_ids[u] for u in imp_user[imp_idx]],
            "ts": [start + timedelta(seconds=float(s)) for s in imp_t[imp_idx]],
            "item_id": [item_ids[i] for i in rows_item],
            "clicked": rows_click,
            "position": pl.Series(rows_pos, dtype=pl.Int32),
        }
    )

    # Interactions: the pre-log history (no time) plus every click, at its time.
    clicks = impressions.filter(pl.col("clicked")).select("user_id", "item_id", "ts")
    interactions = pl.concat(
        [
            history.with_columns(pl.lit(None, dtype=pl.Datetime("us", "UTC")).alias("ts")),
            clicks,
        ]
    ).with_columns(pl.lit(1.0).alias("weight"))

    truth = GroundTruth(
        item_topic=pl.DataFrame(
            {"item_id": item_ids, "topic": [topics[t] for t in item_topic], "quality": quality}
        ),
        user_topics=pl.concat(
            [
                pl.DataFrame(
                    {"user_id": user_ids, "topic": [topics[t] for t in first], "affinity": 1.0}
                ),
                pl.DataFrame(
                    {
                        "user_id": [user_ids[u] for u in np.flatnonzero(has_second)],
                        "topic": [topics[t] for t in second[has_second]],
                        "affinity": 0.6,
                    }
                ),
            ]
        ),
        config=c,
    )
    data = Dataset(
        conform(ITEMS, items),
        conform(INTERACTIONS, interactions),
        conform(IMPRESSIONS, impressions),
    )
    return data, truth
